"""The BullMQ queue of webhook deliveries: one job per event, retried on the webhook schedule.

Why a queue: a delivery must survive the process that started it. A worker that dies mid-POST
leaves its delivery job active with a lock that expires; BullMQ's stalled check (run by any
worker process) puts it back to wait and another worker sends it again, with the same event
id. Retries are BullMQ delayed jobs, so a receiver down for hours costs no process anything
while it waits. The delivery job's id is the event id: adding the same event twice (two
sweeps, or a sweep repeated after a crash) keeps the one job.

The consumer (worker processes only) is in `queue/delivery_worker.py`.
"""

from __future__ import annotations

import math
import random
from collections.abc import Awaitable, Callable
from typing import Any

import orjson
from bullmq import Queue
from pydantic import BaseModel, ConfigDict, Field
from redis.asyncio import Redis

from flow_api.models import WebhookEventType
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.settings import RedisSettings, WorkerSettings

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


Send = Callable[[Delivery, int], Awaitable[None]]
"""Sends one attempt (`attempt` 1 for the first); raises `DeliveryFailed` to be retried."""


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


class AttemptLog:
    """Writes delivery attempts into the job's own log (read back by `history`)."""

    def __init__(self, redis: Redis, job_key: Callable[[str], str]) -> None:
        self.redis = redis
        self.job_key = job_key
        self._record = redis.register_script(_RECORD)

    async def record(self, job_id: str, entry: dict[str, Any]) -> None:
        key = self.job_key(job_id)
        await self._record(keys=[key, f"{key}:logs"], args=[orjson.dumps(entry).decode()])
