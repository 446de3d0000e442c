"""Shared fixtures: a real valkey-server for the session, a real API on a loopback port, and an
in-process worker. Each test gets its own queue name, so tests never see each other's jobs."""

from __future__ import annotations

import asyncio
import sys
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable, Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.providers import ProviderRegistry, build_registry
from flow_api.service import api_server
from flow_api.settings import (
    ApiSettings,
    LocalSettings,
    ProviderSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)
from flow_api.worker import FlowWorker


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


def make_settings(redis_url: str, **sections: Any) -> Settings:
    """Test settings: fake provider on and default, local model off, fast retries."""
    base: dict[str, Any] = {
        "redis": RedisSettings(url=redis_url, queue_name=f"test-{uuid.uuid4().hex[:8]}"),
        "api": ApiSettings(port=free_port()),
        "worker": WorkerSettings(
            concurrency=20,
            job_timeout_s=5,
            backoff_base_ms=50,
            backoff_max_ms=500,
            shutdown_grace_s=5,
            stalled_interval_ms=5000,
            lock_duration_ms=10_000,
        ),
        "provider": ProviderSettings(fake_enabled=True, default="fake"),
        "local": LocalSettings(enabled=False),
    }
    base.update(sections)
    return Settings(**base)


@pytest.fixture
def settings(valkey: EmbeddedValkey) -> Settings:
    return make_settings(valkey.url)


class Api:
    """A real uvicorn server on a loopback port, and an HTTP client for it."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        self.settings = settings
        self.client = client

    async def submit(self, prompt: str, **options: Any) -> str:
        answer = await self.client.post(
            "/api/ai/generate", json={"prompt": prompt, "options": options}
        )
        assert answer.status_code == 202, answer.text
        job_id: str = answer.json()["jobId"]
        return job_id

    async def wait(self, job_id: str, timeout_s: float = 20) -> dict[str, Any]:
        """Poll status until the job finishes; returns the last status body."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            body: dict[str, Any] = (await self.client.get(f"/api/ai/status/{job_id}")).json()
            if body["status"] in ("completed", "failed", "cancelled"):
                return body
            assert asyncio.get_running_loop().time() < deadline, f"job {job_id} stuck: {body}"
            await asyncio.sleep(0.05)


async def start_api(
    settings: Settings, registry: ProviderRegistry | None = None
) -> tuple[Any, asyncio.Task[None]]:
    server = api_server(settings, registry)
    task = asyncio.create_task(server.serve())
    while not server.started:
        assert not task.done(), "the API server stopped during start-up"
        await asyncio.sleep(0.01)
    return server, task


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    server, task = await start_api(settings)
    base = f"http://127.0.0.1:{settings.api.port}"
    async with httpx.AsyncClient(base_url=base, timeout=10) as client:
        yield Api(settings, client)
    server.should_exit = True
    await task


WorkerFactory = Callable[..., Awaitable[FlowWorker]]


@pytest.fixture
async def start_worker(settings: Settings) -> AsyncIterator[WorkerFactory]:
    """Start in-process workers on demand (`await start_worker()`); all stopped at teardown."""
    running: list[tuple[FlowWorker, ProviderRegistry, asyncio.Task[None]]] = []

    async def start(
        worker_settings: Settings | None = None, registry: ProviderRegistry | None = None
    ) -> FlowWorker:
        chosen = worker_settings or settings
        registry = registry or build_registry(chosen)
        worker = FlowWorker(chosen, registry)
        running.append((worker, registry, asyncio.create_task(worker.run())))
        return worker

    yield start
    for worker, registry, task in running:
        await worker.stop()
        await asyncio.wait_for(task, 15)
        await registry.aclose()


@pytest.fixture
async def worker(start_worker: WorkerFactory) -> FlowWorker:
    return await start_worker()


def repo_root() -> Path:
    return Path(__file__).resolve().parent.parent


def pytest_sessionfinish(session: pytest.Session, exitstatus: int) -> None:
    """Native model code runs only in model processes: the test process must never load it
    (a llama.cpp build that crashes on this CPU must fail one test, not kill the run)."""
    if "llama_cpp" in sys.modules:
        session.exitstatus = pytest.ExitCode.TESTS_FAILED
        reporter = session.config.pluginmanager.get_plugin("terminalreporter")
        message = "FAILED: llama_cpp was imported into the pytest process"
        if reporter is not None:
            reporter.ensure_newline()
            reporter.write_line(message, red=True)
        else:
            print(message, file=sys.stderr)
