"""Fixtures every suite shares: a real valkey-server for the session, the provider simulator,
a real API on a loopback port, and in-process workers. Each test gets its own queue name, so
tests never see each other's jobs. Helpers live in `tests/support/`."""

from __future__ import annotations

import asyncio
import sys
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.providers import ProviderRegistry, build_registry
from flow_api.settings import Settings
from flow_api.testing import Simulator, SimulatorConfig
from flow_api.worker import FlowWorker
from tests.support import Api, WorkerFactory, make_settings, serving


@pytest.fixture(scope="session")
def valkey(tmp_path_factory: pytest.TempPathFactory) -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(tmp_path_factory.mktemp("valkey"))
    server.start()
    yield server
    server.stop()


@pytest.fixture
def settings(valkey: EmbeddedValkey) -> Settings:
    return make_settings(valkey.url)


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    """The OpenAI/Anthropic-compatible simulator on loopback; `stats.requests` counts calls.
    A scripted 429 asks for 0.2 s, so tests that meet one stay short."""
    async with Simulator(SimulatorConfig(retry_after_s=0.2)) as sim:
        yield sim


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serving(settings) as api:
        yield api


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
