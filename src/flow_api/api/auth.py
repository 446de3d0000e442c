"""Who is calling: the API key is checked before the body is read (`AuthenticateFirst`), and
routes declare the scope they need through dependency aliases.

`SubmitterDep` (submit scope, counted against the key's request rate), `WriterDep` (submit
scope: cancel), `ReaderDep` (read scope), `AccessDep` (the `AccessControl` itself).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from starlette.datastructures import Headers
from starlette.types import ASGIApp, Receive, Send
from starlette.types import Scope as AsgiScope

from flow_api.api.errors import flow_error_response
from flow_api.auth.access import AccessControl
from flow_api.auth.principal import Principal, Scope
from flow_api.errors import FlowError, Forbidden

AUTHENTICATED_PATHS = ("/api/", "/v1/")
"""Every endpoint under these prefixes needs a key (when authentication is on)."""


class AuthenticateFirst:
    """Checks the `Authorization` header of `/api/` and `/v1/` requests before anything reads
    the body.

    FastAPI reads and parses a body parameter before it runs any dependency, so with the key
    checked in a dependency a caller without a key could make the API read, parse and validate
    a body (and learn from a 400 or 422 how it is checked), and a slow body held a connection
    for as long as the sender liked. Here a missing or bad key is a 401 at once; when the
    request carries a body that is left unread, the answer closes the connection.
    """

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: AsgiScope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or not scope["path"].startswith(AUTHENTICATED_PATHS):
            await self.app(scope, receive, send)
            return
        access: AccessControl = scope["app"].state.access
        headers = Headers(scope=scope)
        try:
            principal = await access.authenticate(headers.get("authorization"))
        except FlowError as exc:
            unread = headers.get("content-length", "0") != "0" or "transfer-encoding" in headers
            close = {"Connection": "close"} if unread else None
            await flow_error_response(exc, close)(scope, receive, send)
            return
        scope.setdefault("state", {})["principal"] = principal
        await self.app(scope, receive, send)


# Declared for OpenAPI (the "Authorize" button in /docs); the header is parsed by
# `AccessControl`, so that a missing or malformed one gets our JSON 401.
_bearer = HTTPBearer(auto_error=False, description="an API key from `flow-api keys create`")


async def _access(request: Request) -> AccessControl:  # async: no thread hop (deps.py)
    access: AccessControl = request.app.state.access
    return access


AccessDep = Annotated[AccessControl, Depends(_access)]


async def _principal(
    request: Request,
    access: AccessDep,
    _: Annotated[HTTPAuthorizationCredentials | None, Security(_bearer)],
) -> Principal:
    known: Principal | None = getattr(request.state, "principal", None)  # AuthenticateFirst
    return known or await access.authenticate(request.headers.get("authorization"))


def _requires(scope: Scope) -> Callable[[Principal], Awaitable[Principal]]:
    async def check(principal: Annotated[Principal, Depends(_principal)]) -> Principal:
        if not principal.allows(scope):
            raise Forbidden(f"this API key lacks the {scope.value!r} scope")
        return principal

    return check


async def _submitter(
    principal: Annotated[Principal, Depends(_requires(Scope.SUBMIT))], access: AccessDep
) -> Principal:
    await access.admit_submit(principal)
    return principal


SubmitterDep = Annotated[Principal, Depends(_submitter)]
WriterDep = Annotated[Principal, Depends(_requires(Scope.SUBMIT))]
ReaderDep = Annotated[Principal, Depends(_requires(Scope.READ))]
