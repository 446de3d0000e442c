"""`FlowWorker`: a worker process's job runner, owning its Redis pool for its whole run."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import os
from collections.abc import AsyncIterator
from wsgiref.simple_server import WSGIServer

from prometheus_client import start_http_server
from redis.asyncio import Redis

from flow_api.auth.quota import TokenQuota
from flow_api.auth.spend import SpendCap
from flow_api.budget import RateBudget
from flow_api.heartbeat import INTERVAL_S, Heartbeat, write_heartbeat
from flow_api.history import WORKER_ID
from flow_api.jobs import now_ms
from flow_api.observability.attempts import ObservedHandler, observed_call
from flow_api.observability.metrics import METRICS, configure_labels
from flow_api.observability.usage import PriceTable, UsageLedger
from flow_api.providers import Provider, ProviderRegistry
from flow_api.queue.connection import REDIS_TROUBLE, connect
from flow_api.queue.consumer import QueueConsumer
from flow_api.settings import Settings
from flow_api.startup import StartupError
from flow_api.streaming.writer import StreamWriter
from flow_api.webhooks.runner import WebhookRunner
from flow_api.worker.attempt import AttemptChain
from flow_api.worker.steps import (
    Budget,
    CrashLimit,
    Gate,
    ProviderTurn,
    Quota,
    Record,
    Resolve,
    Stream,
    call_provider,
)

log = logging.getLogger(__name__)


RUN_STOP_S = 5.0
"""The longest the worker waits for its webhook deliveries to stop."""


class WorkerStopped(RuntimeError):
    """The worker stopped serving without being asked to: its process must exit non-zero."""


class FlowWorker:
    """A worker process's job runner. No side effects until `run()`; `stop()` drains."""

    def __init__(self, settings: Settings, registry: ProviderRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.budget = RateBudget(settings)  # provider rate limits shared by all workers
        self.consumer: QueueConsumer | None = None
        self.streams: StreamWriter | None = None
        self._stop_requested = False

    @contextlib.asynccontextmanager
    async def _lifespan(self) -> AsyncIterator[Redis]:
        """The process's one Redis pool (quota, budget, cancels, heartbeat), closed on exit."""
        redis = connect(self.settings.redis)
        self.budget = RateBudget(self.settings, redis)
        streams = StreamWriter(redis, self.settings)
        self.streams = streams if self.settings.stream.enabled else None
        try:
            async with self.budget, streams.running():
                yield redis
        finally:
            await redis.aclose()

    def handler(self, redis: Redis) -> ObservedHandler:
        """The consumer's handler: the attempt chain, observed (metrics, traces, usage)."""
        usage = self.settings.usage
        ledger = UsageLedger(redis, self.settings.redis.queue_name, usage.retention_days)
        return ObservedHandler(self.chain(redis), ledger)

    def chain(self, redis: Redis) -> AttemptChain:
        """An attempt's steps, in order; the provider call comes after the last."""
        auth = self.settings.auth
        quota = TokenQuota(redis, self.settings.redis.queue_name, auth.quota_window_s)
        steps = [
            Quota(quota, SpendCap(redis, self.settings.redis.queue_name, auth.quota_window_s, "")),
            Resolve(self.registry, self.settings.worker),
            CrashLimit(self.settings.worker),
            Budget(self.budget),
            Record(),
            Gate(),
            ProviderTurn(self.registry),
        ]
        if self.streams is not None:
            steps.append(Stream(self.streams, self.settings.stream.tokens))
        return AttemptChain(steps, observed_call(call_provider, PriceTable(self.settings.usage)))

    async def run(self) -> None:
        """Serve until `stop()`. Raises when the worker cannot serve (its slots keep dying, or
        its loop ended unasked), so that the process exits non-zero."""
        slots = self.settings.worker.concurrency
        log.info(
            "worker consuming queue %r with %d slots as %s; providers: %s (default %s)",
            self.settings.redis.queue_name,
            slots,
            WORKER_ID,
            ", ".join(self.registry.names) or "none",
            self.registry.default,
        )
        warming = [asyncio.create_task(_warm(p)) for p in self.registry.providers.values()]
        configure_labels(self.settings, self.registry)
        METRICS.slots.set(slots)
        metrics_server = serve_metrics(self.settings)
        try:
            async with self._lifespan() as redis:
                consumer = QueueConsumer(
                    redis, self.settings.redis, self.settings.worker, self.handler(redis)
                )
                self.consumer = consumer
                if self._stop_requested:
                    return
                beating = asyncio.create_task(self._beat(redis, consumer))
                webhooks = WebhookRunner(self.settings, redis)
                hooking = asyncio.create_task(webhooks.run())
                try:
                    await consumer.run()
                finally:
                    beating.cancel()
                    await webhooks.stop()
                    with contextlib.suppress(asyncio.CancelledError):
                        await beating
                    # Deliveries are a side line: their end (or failure, logged by the
                    # runner) never holds up or fails the worker's own stop.
                    await asyncio.wait([hooking], timeout=RUN_STOP_S)
                    hooking.cancel()
                if not self._stop_requested:
                    raise WorkerStopped("the worker's queue loop ended without a stop request")
        finally:
            for task in warming:
                task.cancel()
            if metrics_server is not None:
                metrics_server.shutdown()
                metrics_server.server_close()

    async def stop(self) -> None:
        self._stop_requested = True
        if self.consumer is not None:
            await self.consumer.stop()

    def hurry(self) -> None:
        """End `stop()`'s grace period now (a second stop signal)."""
        if self.consumer is not None:
            self.consumer.hurry()

    @property
    def live_slots(self) -> int:
        return self.consumer.live_slots if self.consumer is not None else 0

    async def _beat(self, redis: Redis, consumer: QueueConsumer) -> None:
        """Report the live slot count to Redis; log it when it changes."""
        slots = self.settings.worker.concurrency
        reported = -1
        failing = False  # one warning per outage: a full Redis refuses every beat
        while True:
            live = consumer.live_slots
            if live != reported and live > 0 and not self._stop_requested:
                level = logging.INFO if live == slots else logging.WARNING
                log.log(level, "worker %s: %d of %d slots live", WORKER_ID, live, slots)
                reported = live
            beat = Heartbeat(
                worker=WORKER_ID,
                pid=os.getpid(),
                slots=slots,
                live_slots=live,
                in_flight=consumer.in_flight,
                at_ms=now_ms(),
            )
            METRICS.slots_live.set(live)
            METRICS.in_flight.set(beat.in_flight)
            try:
                await write_heartbeat(redis, self.settings.redis.queue_name, beat)
            except REDIS_TROUBLE as exc:  # down, or out of memory: the next beat tries again
                METRICS.redis_errors.labels("heartbeat").inc()
                if not failing:
                    log.warning("heartbeat not written: %s; retrying", type(exc).__name__)
                failing = True
            else:
                if failing:
                    log.info("heartbeat written again")
                failing = False
            await asyncio.sleep(INTERVAL_S if live == slots else 0.2)


def serve_metrics(settings: Settings) -> WSGIServer | None:
    """This worker's `/metrics` on `FLOW_METRICS_WORKER_PORT` (None: not asked for). Served
    from a thread by prometheus-client, so a busy event loop never delays a scrape."""
    metrics = settings.metrics
    if metrics.worker_port is None:
        return None
    try:
        server, _ = start_http_server(
            metrics.worker_port, metrics.worker_host, registry=METRICS.registry
        )
    except OSError as exc:
        raise StartupError(
            f"cannot serve metrics on {metrics.worker_host}:{metrics.worker_port}: "
            f"{exc.strerror or exc}. Give each worker process its own FLOW_METRICS_WORKER_PORT"
        ) from exc
    log.info("metrics on http://%s:%d/metrics", metrics.worker_host, server.server_port)
    return server


async def _warm(provider: Provider) -> None:
    try:
        await provider.warm_up()
    except Exception as exc:  # the first job will report it with its code
        log.warning("could not warm up provider %s: %s", provider.name, exc)
