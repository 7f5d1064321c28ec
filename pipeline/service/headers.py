"""The headers every answer carries, and cross-origin access only where it is configured.

* ``Content-Security-Policy`` (:data:`CSP`): scripts, styles, fetches and images from the
  service's own origin only; no inline script or style element, no ``eval``, no plugins, no
  framing, no ``<base>``. The page (``web/``) is written for it: its one script is a module
  file, its handlers are attached from that file, and it writes values as text. So even a
  value that got onto the page as markup could not run.
* ``X-Content-Type-Options: nosniff`` (an answer is what its type says, never a script),
  ``Referrer-Policy: no-referrer`` (track ids in addresses stay here), ``X-Frame-Options: DENY``
  (older browsers' ``frame-ancestors``), ``Cross-Origin-Opener-Policy: same-origin``.
* ``Cache-Control: no-store`` on the API (``/v1/``): answers depend on who asks.

CORS: none unless ``MOODSTREAM_CORS_ORIGINS`` lists origins; then Starlette's CORS middleware
answers those origins only (GET and POST, the credential headers), never ``*`` and never with
cookies (the API takes no cookies).
"""

from __future__ import annotations

from fastapi import FastAPI
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pipeline.service.auth import API_KEY_HEADER
from pipeline.settings import Settings

CSP = "; ".join(
    [
        "default-src 'none'",
        "script-src 'self'",
        "style-src 'self'",
        "img-src 'self' data:",
        # the player plays an upload's own file or a track's fetched audio, as blob: URLs
        "media-src 'self' blob:",
        "connect-src 'self'",
        "font-src 'self'",
        "manifest-src 'self'",
        "base-uri 'none'",
        "form-action 'self'",
        "frame-ancestors 'none'",
    ]
)

HEADERS: tuple[tuple[bytes, bytes], ...] = (
    (b"content-security-policy", CSP.encode()),
    (b"x-content-type-options", b"nosniff"),
    (b"referrer-policy", b"no-referrer"),
    (b"x-frame-options", b"DENY"),
    (b"cross-origin-opener-policy", b"same-origin"),
)


class SecurityHeaders:
    """ASGI middleware: :data:`HEADERS` on every HTTP answer (replacing any of the same name),
    ``Cache-Control: no-store`` on the API's."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        api = scope["path"].startswith("/v1/")

        async def send_with_headers(message: Message) -> None:
            if message["type"] == "http.response.start":
                ours = dict(HEADERS)
                if api:
                    ours[b"cache-control"] = b"no-store"
                kept = [(k, v) for k, v in message.get("headers", []) if k.lower() not in ours]
                message = {**message, "headers": kept + list(ours.items())}
            await send(message)

        await self.app(scope, receive, send_with_headers)


def add_headers(app: FastAPI, settings: Settings) -> None:
    """The security headers on every answer, and CORS for the configured origins only. Added
    last, so they wrap everything else (errors and CORS preflights included)."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=list(settings.cors_origins),
            allow_methods=["GET", "POST"],
            allow_headers=["Authorization", API_KEY_HEADER, "Content-Type"],
            expose_headers=["Retry-After", "WWW-Authenticate"],
            allow_credentials=False,
            max_age=600,
        )
    app.add_middleware(SecurityHeaders)
