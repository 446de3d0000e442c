"""A real API server (uvicorn, loopback port) on the test's event loop, and in-process workers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator, Awaitable, Callable

import httpx
import uvicorn

from flow_api.providers import ProviderRegistry
from flow_api.service import api_server
from flow_api.settings import Settings
from flow_api.worker import FlowWorker
from tests.support.client import Api

WorkerFactory = Callable[..., Awaitable[FlowWorker]]
"""`await start_worker(settings=None, registry=None)`: see the `start_worker` fixture."""


async def start_api(
    settings: Settings, registry: ProviderRegistry | None = None
) -> tuple[uvicorn.Server, asyncio.Task[None]]:
    server = api_server(settings, registry)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the API server stopped during start-up"
        await asyncio.sleep(0.01)
    return server, task


@contextlib.asynccontextmanager
async def serving(
    settings: Settings, registry: ProviderRegistry | None = None
) -> AsyncIterator[Api]:
    """A real API server on `settings.api.port` for the block, and a client for it."""
    server, task = await start_api(settings, registry)
    base = f"http://127.0.0.1:{settings.api.port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            yield Api(settings, client)
    finally:
        server.should_exit = True
        await task
