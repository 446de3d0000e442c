"""Pure-ASGI limits on a request body: a size (413 before the body is parsed, whether or not it
is chunked) and a time to receive it all (408).

uvicorn has no body read timeout (`timeout_keep_alive` only applies between requests): a client
that sends the headers and half a body held a connection, and the request's task, for as long
as it liked. Here the whole body must arrive within `timeout_s` of the first read.
"""

from __future__ import annotations

import asyncio

from starlette.exceptions import HTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from flow_api.api.errors import error_response

UPLOAD_OVERHEAD_BYTES = 65_536
"""Room for a multipart upload's framing around the file itself."""


class BodySizeLimit:
    """`uploads`: (exact path, size, time) for the one path with limits of its own (batch files)."""

    def __init__(
        self,
        app: ASGIApp,
        max_bytes: int,
        timeout_s: float,
        uploads: tuple[str, int, float] | None = None,
    ) -> None:
        self.app = app
        self.default = (max_bytes, timeout_s)
        self.uploads = uploads

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limits = self.default
        if self.uploads is not None and scope["path"] == self.uploads[0]:
            limits = self.uploads[1:]
        await _Limited(self.app, *limits)(scope, receive, send)


class _Limited:
    def __init__(self, app: ASGIApp, max_bytes: int, timeout_s: float) -> None:
        self.app = app
        self.max_bytes = max_bytes
        self.timeout_s = timeout_s

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        declared = dict(scope.get("headers") or []).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > self.max_bytes:
            await self._reject(scope, receive, send)
            return
        seen = 0
        complete = False
        deadline: float | None = None

        async def limited() -> Message:
            nonlocal seen, complete, deadline
            if complete:  # past the body: a wait for the disconnect, not for the body
                return await receive()
            loop = asyncio.get_running_loop()
            deadline = deadline or loop.time() + self.timeout_s
            try:
                async with asyncio.timeout_at(deadline):
                    message = await receive()
            except TimeoutError:
                raise _TooSlow(
                    408,
                    f"the request body did not arrive within {self.timeout_s:g} s",
                    headers={"Connection": "close"},
                ) from None
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge(413)
                complete = not message.get("more_body", False)
            else:
                complete = True
            return message

        try:
            await self.app(scope, limited, send)
        except _TooLarge:
            await self._reject(scope, receive, send)

    async def _reject(self, scope: Scope, receive: Receive, send: Send) -> None:
        response = error_response(
            413, "payload_too_large", f"the request body exceeds {self.max_bytes} bytes"
        )
        await response(scope, receive, send)


class _TooLarge(HTTPException):
    """An HTTPException, so FastAPI's body reader passes it on instead of making it a 400."""


class _TooSlow(HTTPException):
    """408 `request_timeout` (see `api/errors.py`); it closes the connection."""
