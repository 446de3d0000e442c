"""A webhook receiver on loopback for tests: records every request, answers from a script."""

from __future__ import annotations

import asyncio
from collections import deque
from dataclasses import dataclass, field
from typing import Any

import orjson
from aiohttp import web
from standardwebhooks.webhooks import Webhook

from flow_api.embedded import free_port

ANSWER_BODY = "receiver-private-answer-text"
"""What the receiver answers with: it must never appear in a job's record."""


@dataclass
class Received:
    headers: dict[str, str]
    body: str

    @property
    def event_id(self) -> str:
        return self.headers["webhook-id"]

    @property
    def payload(self) -> dict[str, Any]:
        parsed: dict[str, Any] = orjson.loads(self.body)
        return parsed

    def verify(self, secret: str) -> dict[str, Any]:
        """The payload, once the `standardwebhooks` library accepts the signature."""
        verified: dict[str, Any] = Webhook(secret).verify(self.body, self.headers)
        return verified


@dataclass
class Receiver:
    """`statuses` are answered in turn (then 200); `hang` holds requests until released."""

    statuses: deque[int] = field(default_factory=deque)
    hang: bool = False
    received: list[Received] = field(default_factory=list)
    port: int = 0
    arrived: asyncio.Event = field(default_factory=asyncio.Event)
    release: asyncio.Event = field(default_factory=asyncio.Event)
    _runner: web.AppRunner | None = None

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}/hooks?team=a"

    async def _handle(self, request: web.Request) -> web.Response:
        body = await request.text()
        self.received.append(Received({k.lower(): v for k, v in request.headers.items()}, body))
        self.arrived.set()
        if self.hang:
            await self.release.wait()
        status = self.statuses.popleft() if self.statuses else 200
        return web.Response(status=status, text=ANSWER_BODY)

    async def start(self) -> Receiver:
        app = web.Application()
        app.router.add_post("/hooks", self._handle)
        self._runner = web.AppRunner(app, handle_signals=False)
        await self._runner.setup()
        self.port = free_port()
        await web.TCPSite(self._runner, "127.0.0.1", self.port).start()
        return self

    async def stop(self) -> None:
        self.release.set()
        if self._runner is not None:
            await self._runner.cleanup()

    async def wait_for(self, count: int, timeout_s: float = 30) -> list[Received]:
        """Until at least `count` requests arrived; all received so far."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while len(self.received) < count:
            assert asyncio.get_running_loop().time() < deadline, (
                f"{len(self.received)} of {count} webhook requests arrived"
            )
            await asyncio.sleep(0.02)
        return list(self.received)
