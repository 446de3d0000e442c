"""Fixtures for the hostile-input suite: the real API served from its own thread, for blocking
clients such as Schemathesis, and a client that opens a fresh connection for every request."""

from __future__ import annotations

import asyncio
import threading
import time
from collections.abc import AsyncIterator, Iterator

import httpx
import pytest
import requests

from flow_api.embedded import EmbeddedValkey
from flow_api.service import api_server
from flow_api.settings import Settings
from tests.support import Api, make_settings


class ThreadedApi:
    """A real uvicorn server on a loopback port, running its own event loop in a thread.

    Schemathesis sends each case with a blocking `requests` call. The `api` fixture's server
    runs on the test's event loop, which is idle while a blocking test runs, so it could never
    answer; this one can.
    """

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self.base_url = f"http://127.0.0.1:{settings.api.port}"
        self._server = api_server(settings)
        self._thread = threading.Thread(target=self._serve, name="fuzz-api", daemon=True)

    def _serve(self) -> None:
        asyncio.run(self._server.serve())

    def start(self, timeout_s: float = 15) -> None:
        self._thread.start()
        deadline = time.monotonic() + timeout_s
        while not self._server.started:
            assert self._thread.is_alive(), "the API server stopped during start-up"
            assert time.monotonic() < deadline, "the API server did not start in time"
            time.sleep(0.01)

    def stop(self, timeout_s: float = 15) -> None:
        self._server.should_exit = True
        self._thread.join(timeout_s)
        assert not self._thread.is_alive(), "the API server did not stop in time"


@pytest.fixture(scope="module")
def threaded_api(valkey: EmbeddedValkey) -> Iterator[ThreadedApi]:
    """One server (and queue name) per module: Hypothesis runs many cases per test, and a
    function-scoped server would be shared by all of them anyway."""
    server = ThreadedApi(make_settings(valkey.url))
    server.start()
    yield server
    server.stop()


@pytest.fixture(scope="module")
def http_session() -> Iterator[requests.Session]:
    with requests.Session() as session:
        yield session


@pytest.fixture
async def fresh(api: Api) -> AsyncIterator[httpx.AsyncClient]:
    """A client for the `api` server that never reuses a connection: after an unexpected
    exception uvicorn closes the connection, and a reused one would fail the next request
    with a reset instead of showing its answer."""
    async with httpx.AsyncClient(
        base_url=api.client.base_url,
        timeout=30,
        limits=httpx.Limits(max_keepalive_connections=0),
    ) as client:
        yield client
