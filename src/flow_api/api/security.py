"""Browser-facing protections: security headers on every answer, and CORS when configured.

`SecurityHeaders` is pure ASGI (no per-request Request/Response objects). API answers get a
CSP that allows nothing (they are JSON, never a page) and `Cache-Control: no-store`, since they
carry prompts and results; the docs pages get the CSP that FastAPI's Swagger UI and ReDoc
need (their scripts and styles from cdn.jsdelivr.net, inline bootstrap scripts, fonts).
"""

from __future__ import annotations

from collections.abc import Collection

from fastapi import FastAPI
from starlette.datastructures import MutableHeaders
from starlette.middleware.cors import CORSMiddleware
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flow_api.settings import AuthSettings

_COMMON = {
    "X-Content-Type-Options": "nosniff",
    "X-Frame-Options": "DENY",
    "Referrer-Policy": "no-referrer",
}

API_HEADERS = {
    **_COMMON,
    "Cache-Control": "no-store",
    "Content-Security-Policy": "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; "
    "form-action 'none'",
}
"""Headers of every API answer (also used for the 500 that Starlette sends outside middleware)."""

_CDN = "https://cdn.jsdelivr.net"
DOCS_HEADERS = {
    **_COMMON,
    "Content-Security-Policy": (
        f"default-src 'none'; script-src 'unsafe-inline' {_CDN}; "
        f"style-src 'unsafe-inline' {_CDN} https://fonts.googleapis.com; "
        "font-src https://fonts.gstatic.com; img-src 'self' data: https://fastapi.tiangolo.com "
        f"{_CDN}; connect-src 'self'; worker-src blob:; frame-ancestors 'none'; "
        "base-uri 'none'; form-action 'none'"
    ),
}


class SecurityHeaders:
    """Adds `API_HEADERS` (or `DOCS_HEADERS` under `docs_paths`) unless the app set them."""

    def __init__(self, app: ASGIApp, docs_paths: Collection[str] = ()) -> None:
        self.app = app
        self.docs_paths = tuple(docs_paths)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        path: str = scope.get("path", "")
        docs = any(path == p or path.startswith(p + "/") for p in self.docs_paths)
        extra = DOCS_HEADERS if docs else API_HEADERS

        async def send_secured(message: Message) -> None:
            if message["type"] == "http.response.start":
                message.setdefault("headers", [])
                headers = MutableHeaders(scope=message)
                for name, value in extra.items():
                    headers.setdefault(name, value)
            await send(message)

        await self.app(scope, receive, send_secured)


def install_security(app: FastAPI, settings: AuthSettings) -> None:
    """CORS (only for `settings.cors_origins`), then security headers outermost, so CORS
    preflights and the body-limit 413 get them too. Call after the other middleware."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
            max_age=600,
        )
    docs = [p for p in (app.docs_url, app.redoc_url) if p]
    app.add_middleware(SecurityHeaders, docs_paths=docs)
