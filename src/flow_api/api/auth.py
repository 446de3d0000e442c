"""Dependency aliases for who is calling: routes declare the scope they need.

`SubmitterDep` (submit scope, counted against the key's request rate), `WriterDep` (submit
scope: cancel), `ReaderDep` (read scope), `AccessDep` (the `AccessControl` itself).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated

from fastapi import Depends, Request, Security
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer

from flow_api.auth.access import AccessControl
from flow_api.auth.principal import Principal, Scope
from flow_api.errors import Forbidden

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
    return await access.authenticate(request.headers.get("authorization"))


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
