"""Answers other than success: every error is ``application/problem+json`` (RFC 9457) with a
``reason`` — the dead-letter reason codes for what is wrong with the audio (``too_large``,
``undecodable``, ``too_short``, ``inference_failed``, ``not_found``), and ``bad_request``,
``busy``, ``timeout``, ``unavailable``, ``method_not_allowed``, ``internal`` for the rest; who may
ask (:mod:`pipeline.service.auth`): ``unauthenticated``, ``invalid_token``, ``invalid_api_key``
(401, with ``WWW-Authenticate``), ``insufficient_scope`` (403); how often
(:mod:`pipeline.service.limits`): ``rate_limited`` (429, with ``Retry-After``).
FastAPI's and Starlette's own errors are translated here, once."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class Problem(Exception):
    """An answer other than success: becomes an ``application/problem+json`` response."""

    def __init__(
        self,
        status: int,
        reason: str,
        detail: str,
        *,
        retry_after_s: int | None = None,
        headers: dict[str, str] | None = None,
    ) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.retry_after_s = status, reason, detail, retry_after_s
        self.headers = headers or {}


_TITLES = {
    "too_large": "The upload is too large",
    "undecodable": "The upload is not audio this service can decode",
    "too_short": "The audio is too short to analyse",
    "inference_failed": "The model could not score this audio",
    "not_found": "Not found",
    "bad_request": "The request is malformed",
    "busy": "Too many analyses in flight",
    "timeout": "The analysis took too long",
    "unavailable": "A service this answer needs is unavailable",
    "method_not_allowed": "Method not allowed",
    "internal": "Internal error",
    "unauthenticated": "Authentication required",
    "invalid_token": "The bearer token is not accepted",
    "invalid_api_key": "The API key is not accepted",
    "insufficient_scope": "The credentials do not allow this",
    "rate_limited": "Too many requests from this client",
}

#: Every reason a problem can have (the OpenAPI document lists them).
REASONS = tuple(_TITLES)


#: The problem document, as the OpenAPI document describes it (components/schemas/Problem).
PROBLEM_SCHEMA = {
    "type": "object",
    "required": ["type", "title", "status", "detail", "reason"],
    "properties": {
        "type": {"type": "string", "description": "urn:moodstream:problem:<reason>"},
        "title": {"type": "string"},
        "status": {"type": "integer"},
        "detail": {"type": "string"},
        "reason": {"type": "string", "enum": list(REASONS)},
    },
}
_WHEN = {
    400: "malformed: a bad parameter, body or upload framing (bad_request)",
    401: "no credentials, or ones this service does not accept (unauthenticated, invalid_token, invalid_api_key)",
    403: "the credentials lack the scope this needs (insufficient_scope)",
    404: "no such track (not_found)",
    413: "larger than MOODSTREAM_MAX_UPLOAD_BYTES (too_large)",
    415: "not an audio container, or a body of another type (undecodable, bad_request)",
    422: "audio, but undecodable or too short (undecodable, too_short)",
    429: "this client is over its rate (rate_limited); Retry-After says when to try again",
    502: "the model server rejected the audio (inference_failed)",
    503: "too many analyses in flight (busy), or the scorer, catalog or signing keys do not answer (unavailable)",
    504: "longer than MOODSTREAM_ANALYSIS_TIMEOUT_S (timeout)",
}
_HEADERS = {
    401: {"WWW-Authenticate": {"description": "the credentials this service takes", "schema": {"type": "string"}}},
    403: {
        "WWW-Authenticate": {
            "description": "error=insufficient_scope and the scope needed",
            "schema": {"type": "string"},
        }
    },
    429: {"Retry-After": {"description": "seconds", "required": True, "schema": {"type": "integer"}}},
}


def documented(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The ``responses`` of a route that may answer these problems (the OpenAPI document)."""
    return {
        status: {
            "description": _WHEN[status],
            "content": {"application/problem+json": {"schema": {"$ref": "#/components/schemas/Problem"}}},
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


def problem_response(
    status: int,
    reason: str,
    detail: str,
    *,
    retry_after_s: int | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    headers = dict(headers or {})
    if retry_after_s is not None:
        headers["Retry-After"] = str(retry_after_s)
    body = {
        "type": f"urn:moodstream:problem:{reason}",
        "title": _TITLES.get(reason, reason),
        "status": status,
        "detail": detail,
        "reason": reason,
    }
    return JSONResponse(body, status_code=status, headers=headers or None, media_type="application/problem+json")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(
            exc.status, exc.reason, exc.detail, retry_after_s=exc.retry_after_s, headers=exc.headers
        )

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem_response(400, "bad_request", detail)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        # Starlette's own headers stay (a 405's Allow lists the methods the route has).
        return problem_response(exc.status_code, reason, str(exc.detail), headers=exc.headers)

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return problem_response(500, "internal", f"{type(exc).__name__} (logged)")
