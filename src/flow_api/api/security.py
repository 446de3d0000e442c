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

from flow_api.auth.exposure import is_loopback
from flow_api.settings import AuthSettings, Settings

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


UNCHECKED_PATHS = ("/healthz", "/readyz")
"""Probes (a container's or an orchestrator's, by IP) answer whatever the Host: they reveal
nothing."""


def allowed_hosts(settings: Settings) -> list[str] | None:
    """The Host names the API answers, or None for any.

    With authentication off on loopback, a web page the user visits could reach the API
    through a DNS name rebound to 127.0.0.1 (DNS rebinding): its requests carry that name as
    Host, so only loopback names (and `FLOW_API_ALLOWED_HOSTS`) are answered. Elsewhere the
    list applies when it is set.
    """
    if settings.api.allowed_hosts:
        return list(settings.api.allowed_hosts)
    if not settings.auth.enabled and is_loopback(settings.api.host):
        return []
    return None


def host_allowed(host_header: str, extra: Collection[str]) -> bool:
    """True for a loopback Host (`localhost`, `*.localhost`, 127.0.0.0/8, `[::1]`, any port)
    or one matching `extra` (exact names, `*.domain` wildcards, or `*`)."""
    name = host_header.strip().lower()
    if name.startswith("["):
        name = name[1 : name.find("]")] if "]" in name else name
    elif name.count(":") == 1:
        name = name.split(":", 1)[0]
    name = name.rstrip(".")
    if is_loopback(name) or name.endswith(".localhost"):
        return True
    for pattern in (p.strip().lower().rstrip(".") for p in extra):
        if pattern == "*" or name == pattern:
            return True
        if pattern.startswith("*.") and name.endswith(pattern[1:]):
            return True
    return False


class HostGuard:
    """Answers 421 `host_not_allowed` (JSON, as every error) to a Host not in the list.

    Starlette's `TrustedHostMiddleware` answers plain text, which our clients cannot parse.
    """

    def __init__(self, app: ASGIApp, allowed: Collection[str]) -> None:
        self.app = app
        self.allowed = tuple(allowed)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("path") in UNCHECKED_PATHS:
            await self.app(scope, receive, send)
            return
        host = dict(scope.get("headers") or []).get(b"host", b"").decode("latin-1")
        if host_allowed(host, self.allowed):
            await self.app(scope, receive, send)
            return
        from flow_api.api.errors import error_response  # it imports this module's headers

        response = error_response(
            421,
            "host_not_allowed",
            f"this API does not answer for host {host[:100]!r}: without authentication it "
            "serves loopback names only; add the name to FLOW_API_ALLOWED_HOSTS to allow it",
        )
        await response(scope, receive, send)


def install_security(
    app: FastAPI, settings: AuthSettings, hosts: Collection[str] | None = None
) -> None:
    """CORS (only for `settings.cors_origins`), the Host check (unless `hosts` is None; see
    `allowed_hosts`), then security headers outermost, so CORS preflights, the Host check's
    and the body-limit's answers get them too. Call after the other middleware."""
    if settings.cors_origins:
        app.add_middleware(
            CORSMiddleware,
            allow_origins=settings.cors_origins,
            allow_methods=["GET", "POST", "DELETE"],
            allow_headers=["Authorization", "Content-Type", "Idempotency-Key"],
            expose_headers=["Location", "Retry-After", "Idempotent-Replayed"],
            max_age=600,
        )
    if hosts is not None:
        app.add_middleware(HostGuard, allowed=hosts)
    docs = [p for p in (app.docs_url, app.redoc_url) if p]
    app.add_middleware(SecurityHeaders, docs_paths=docs)
