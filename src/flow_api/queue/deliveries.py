"""The BullMQ queue of webhook deliveries: one job per event, retried on the webhook schedule.

Why a queue: a delivery must survive the process that started it. A worker that dies mid-POST
leaves its delivery job active with a lock that expires; BullMQ's stalled check (run by any
worker process) puts it back to wait and another worker sends it again, with the same event
id. Retries are BullMQ delayed jobs, so a receiver down for hours costs no process anything
while it waits. The delivery job's id is the event id: adding the same event twice (two
sweeps, or a sweep repeated after a crash) keeps the one job.

The stock bullmq `Worker` runs the deliveries: unlike generation jobs they are few, so its
cost per job at high concurrency (see `slot_worker`) does not matter here.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from bullmq import Queue, UnrecoverableError, Worker
from pydantic import BaseModel, ConfigDict, Field, ValidationError
from redis.asyncio import Redis

from flow_api.models import WebhookEventType
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.settings import RedisSettings, WebhookSettings, WorkerSettings

log = logging.getLogger(__name__)

BACKOFF_TYPE = "flow-webhook"

# Append a line to a job's log only while the job exists: a delivery retried after its job
# expired must not leave a log list behind with no owner. KEYS: job hash, its log list.
_RECORD = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
redis.call("RPUSH", KEYS[2], ARGV[1])
return 1
"""


class Delivery(BaseModel):
    """What one delivery job carries: the event, already rendered (so every attempt sends the
    same bytes), and where it goes."""

    model_config = ConfigDict(frozen=True, populate_by_name=True)

    event_id: str = Field(alias="eventId")
    job_id: str = Field(alias="jobId")
    tenant: str
    type: WebhookEventType
    url: str
    body: str
    """The JSON body, exactly as signed and sent."""

    def wire(self) -> dict[str, Any]:
        return self.model_dump(by_alias=True, mode="json")


class DeliveryFailed(Exception):
    """An attempt that did not get a 2xx: BullMQ retries it on the schedule."""


def retry_delay_ms(schedule_s: list[float], jitter: float, attempts_made: int) -> int:
    """The wait before retry number `attempts_made` (1 for the first retry): the schedule's
    delay, varied by up to `jitter` either way so that a receiver's backlog does not come back
    all at once."""
    base = schedule_s[min(attempts_made, len(schedule_s)) - 1] * 1000
    return max(1, math.ceil(base * (1 + random.uniform(-jitter, jitter))))


class DeliveryQueue:
    """The producer side: queue an event's delivery (idempotent by event id)."""

    def __init__(
        self, redis: Redis, settings: RedisSettings, worker: WorkerSettings, name: str
    ) -> None:
        self.redis = redis
        self.retention_s = worker.retention_s
        self.bull = Queue(name, {"connection": redis, "prefix": settings.prefix})

    async def add(self, delivery: Delivery, retries: int) -> None:
        keep = {"age": self.retention_s}
        opts = {
            "jobId": delivery.event_id,
            "attempts": retries + 1,
            "backoff": {"type": BACKOFF_TYPE, "delay": 0},
            "removeOnComplete": keep,
            "removeOnFail": keep,
            "stackTraceLimit": 0,
        }
        with redis_errors_as_unavailable():
            await self.bull.add("deliver", delivery.wire(), opts)

    async def close(self) -> None:
        await self.bull.close()


Send = Callable[[Delivery, int], Awaitable[None]]
"""Sends one attempt (`attempt` 1 for the first); raises `DeliveryFailed` to be retried."""


class DeliveryConsumer:
    """Runs `send` on delivery jobs with `concurrency` at a time until `stop()`."""

    def __init__(
        self,
        redis_settings: RedisSettings,
        worker: WorkerSettings,
        webhook: WebhookSettings,
        name: str,
        send: Send,
    ) -> None:
        self.name = name
        self.send = send
        self.options: dict[str, Any] = {
            "autorun": False,
            "connection": redis_settings.url,
            "prefix": redis_settings.prefix,
            "concurrency": webhook.concurrency,
            "lockDuration": worker.lock_duration_ms,
            "stalledInterval": worker.stalled_interval_ms,
            "maxStalledCount": worker.max_stalled,
            "drainDelay": 1,  # bullmq's close() waits up to drainDelay seconds while idle
            "runRetryDelay": 1000,
            "settings": {
                "backoffStrategy": lambda attempts, _type, _err, _job: retry_delay_ms(
                    webhook.schedule_s, webhook.jitter, attempts
                )
            },
        }
        self.worker: Worker | None = None

    async def _process(self, job: Any, _token: str) -> None:
        try:
            delivery = Delivery.model_validate(job.data)
        except ValidationError as exc:  # not a delivery of ours: never retried
            raise UnrecoverableError(f"not a webhook delivery: {exc}") from None
        await self.send(delivery, int(job.attemptsMade) + 1)

    async def run(self) -> None:
        self.worker = Worker(self.name, self._process, self.options)
        self.worker.on("error", _log_error)
        await self.worker.run()

    async def stop(self) -> None:
        """Stop taking deliveries; one in flight gets a moment, then is left to the stalled
        check (it is sent again: at-least-once)."""
        if self.worker is None:
            return
        closing = asyncio.ensure_future(self.worker.close())
        try:
            await asyncio.wait_for(asyncio.shield(closing), 5)
        except TimeoutError:
            self.worker.cancelProcessing()
            with contextlib.suppress(Exception):
                await closing


class AttemptLog:
    """Writes delivery attempts into the job's own log (read back by `history`)."""

    def __init__(self, redis: Redis, job_key: Callable[[str], str]) -> None:
        self.redis = redis
        self.job_key = job_key
        self._record = redis.register_script(_RECORD)

    async def record(self, job_id: str, entry: dict[str, Any]) -> None:
        key = self.job_key(job_id)
        await self._record(keys=[key, f"{key}:logs"], args=[orjson.dumps(entry).decode()])


def _log_error(err: BaseException, *_: Any) -> None:
    log.warning("webhook delivery worker error: %s: %s", type(err).__name__, err)
