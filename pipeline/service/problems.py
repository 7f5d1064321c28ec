"""Answers other than success: every error is ``application/problem+json`` (RFC 9457) with a
``reason`` — the dead-letter reason codes for what is wrong with the audio (``too_large``,
``undecodable``, ``too_short``, ``inference_failed``, ``not_found``), and ``bad_request``,
``busy``, ``timeout``, ``unavailable``, ``method_not_allowed``, ``internal`` for the rest.
FastAPI's and Starlette's own errors are translated here, once."""

from __future__ import annotations

import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException

log = logging.getLogger(__name__)


class Problem(Exception):
    """An answer other than success: becomes an ``application/problem+json`` response."""

    def __init__(self, status: int, reason: str, detail: str, *, retry_after_s: int | None = None) -> None:
        super().__init__(detail)
        self.status, self.reason, self.detail, self.retry_after_s = status, reason, detail, retry_after_s


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
}


def problem_response(status: int, reason: str, detail: str, *, retry_after_s: int | None = None) -> JSONResponse:
    headers = {"Retry-After": str(retry_after_s)} if retry_after_s is not None else None
    body = {
        "type": f"urn:moodstream:problem:{reason}",
        "title": _TITLES.get(reason, reason),
        "status": status,
        "detail": detail,
        "reason": reason,
    }
    return JSONResponse(body, status_code=status, headers=headers, media_type="application/problem+json")


def add_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(Problem)
    async def on_problem(request: Request, exc: Problem) -> JSONResponse:
        return problem_response(exc.status, exc.reason, exc.detail, retry_after_s=exc.retry_after_s)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(request: Request, exc: RequestValidationError) -> JSONResponse:
        detail = "; ".join(f"{'.'.join(str(p) for p in e['loc'])}: {e['msg']}" for e in exc.errors())
        return problem_response(400, "bad_request", detail)

    @app.exception_handler(HTTPException)
    async def on_http(request: Request, exc: HTTPException) -> JSONResponse:
        reason = {404: "not_found", 405: "method_not_allowed"}.get(exc.status_code, "bad_request")
        return problem_response(exc.status_code, reason, str(exc.detail))

    @app.exception_handler(Exception)
    async def on_bug(request: Request, exc: Exception) -> JSONResponse:
        log.exception("%s %s failed", request.method, request.url.path)
        return problem_response(500, "internal", f"{type(exc).__name__} (logged)")
