"""The API's write side of the queue: add jobs with the service's options, flag cancels."""

from __future__ import annotations

import contextlib
import enum
import logging
import re
import uuid
from collections import defaultdict
from collections.abc import AsyncIterator, Sequence
from typing import Any

from bullmq import Queue
from redis.asyncio import Redis
from redis.exceptions import RedisError

from flow_api.errors import JobNotFound
from flow_api.jobs import JobData, now_ms
from flow_api.keys import CANCEL_FIELD, FINISHING_FIELD, cancel_channel
from flow_api.queue.connection import REDIS_DOWN, connect, redis_errors_as_unavailable
from flow_api.queue.fair_share import FairShare
from flow_api.settings import RedisSettings, WorkerSettings

log = logging.getLogger(__name__)

_HOLD_FAILURES: tuple[type[BaseException], ...] = (RedisError, *REDIS_DOWN)

JOB_NAME = "generate"
BACKOFF_TYPE = "flow-jitter"
"""The custom backoff our workers compute (`consumer.retry_delay_ms`)."""

_JOB_ID = re.compile(r"[0-9a-f]{32}")

# The API's half of the one decision between a cancel and the job's end (the worker's half is
# `consumer._DECIDE`): flag the job cancelled unless it has ended (completed or failed) or a
# worker has decided to finish it. Only on a job that exists (HSET would create a stray hash).
# KEYS: job hash, completed, failed. ARGV: cancel field, now, job id, finishing field.
# 0: no such job; 1: flagged; 2: already flagged; 3: already finished (or finishing).
_FLAG_CANCEL = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
if redis.call("HEXISTS", KEYS[1], ARGV[1]) == 1 then return 2 end
if redis.call("ZSCORE", KEYS[2], ARGV[3]) or redis.call("ZSCORE", KEYS[3], ARGV[3])
   or redis.call("HEXISTS", KEYS[1], ARGV[4]) == 1 then
  return 3
end
redis.call("HSET", KEYS[1], ARGV[1], ARGV[2])
return 1
"""


class CancelDecision(enum.Enum):
    """What a cancel request found."""

    FLAGGED = 1
    """The cancel won: the job will end `cancelled` and never store a result."""
    ALREADY_CANCELLED = 2
    FINISHED = 3
    """The job completed or failed first (or a worker already decided to finish it)."""


def new_job_id() -> str:
    """A random, unguessable job id."""
    return uuid.uuid4().hex


def valid_job_id(job_id: str) -> bool:
    """Whether `job_id` is one this service could have minted.

    BullMQ keys a queue's own structures beside its jobs (`meta`, `wait`, `events`...): only
    ids of our own form may be looked up, so no request can address those.
    """
    return _JOB_ID.fullmatch(job_id) is not None


def job_options(settings: WorkerSettings, job_id: str, priority: int | None) -> dict[str, Any]:
    """BullMQ's options for one of our jobs (BullMQ's camelCase stays in this package)."""
    keep = {"age": settings.retention_s}
    opts: dict[str, Any] = {
        "jobId": job_id,
        "attempts": settings.attempts,
        "backoff": {"type": BACKOFF_TYPE, "delay": settings.backoff_base_ms},
        "removeOnComplete": keep,
        "removeOnFail": keep,
        # No Python tracebacks in Redis: they can quote an SDK's error text (a masked key,
        # a prompt); each attempt's typed error is in the job's log instead.
        "stackTraceLimit": 0,
    }
    if priority is not None:
        opts["priority"] = priority
    return opts


class JobQueue:
    """Producer side of the queue, used by the API (and by benchmarks to fill a queue)."""

    def __init__(self, redis: Redis, redis_settings: RedisSettings, worker: WorkerSettings):
        self.redis = redis
        self.worker = worker
        self.bull = Queue(
            redis_settings.queue_name,
            {"connection": redis, "prefix": redis_settings.prefix},
        )
        self._flag_cancel = redis.register_script(_FLAG_CANCEL)
        self.fair_share: FairShare | None = None
        """Set when jobs wait in per-tenant lines (`FLOW_WORKER_FAIR_SHARE`, the default)."""
        if worker.fair_share:
            self.fair_share = FairShare(redis, self.bull.toKey(""), worker.tenant_weights)

    async def enqueue(
        self,
        data: JobData,
        priority: int | None = None,
        job_id: str | None = None,
        created_ms: int | None = None,
    ) -> str:
        """Durably add a job; returns its id (by default a new random one). `created_ms`: its
        creation time (default now), as the job listing indexed it."""
        job_id = job_id or new_job_id()
        opts = job_options(self.worker, job_id, priority)
        if created_ms is not None:
            opts["timestamp"] = created_ms
        with redis_errors_as_unavailable():
            await self.bull.add(JOB_NAME, data.wire(), opts)
        await self._hold(data.tenant, [(job_id, priority or 0)])
        return job_id

    async def enqueue_many(
        self, jobs: Sequence[JobData], batch: int = 500, ids: Sequence[str] | None = None
    ) -> list[str]:
        """Add many jobs, `batch` per round trip (batches and benchmarks fill queues this way).
        With `ids`, a job whose id is already stored is left as it is (bullmq's add of a known
        id is a no-op), so adding the same chunk again after a crash duplicates nothing."""
        ids = list(ids) if ids is not None else [new_job_id() for _ in jobs]
        entries = [
            {"name": JOB_NAME, "data": d.wire(), "opts": job_options(self.worker, i, None)}
            for d, i in zip(jobs, ids, strict=True)
        ]
        for start in range(0, len(entries), batch):
            with redis_errors_as_unavailable():
                await self.bull.addBulk(entries[start : start + batch])
            by_tenant: dict[str, list[tuple[str, int]]] = defaultdict(list)
            for data, job_id in zip(
                jobs[start : start + batch], ids[start : start + batch], strict=True
            ):
                by_tenant[data.tenant].append((job_id, 0))
            for tenant, held in by_tenant.items():
                await self._hold(tenant, held)
        return ids

    async def _hold(self, tenant: str, jobs: list[tuple[str, int]]) -> None:
        """Move jobs just added into their tenant's line. The jobs are durably queued already:
        if Redis fails here they run in plain FIFO order, so the client is not told 503."""
        if self.fair_share is None:
            return
        try:
            await self.fair_share.hold(tenant, jobs)
        except _HOLD_FAILURES as exc:
            log.warning(
                "job %s queued without its tenant's line (%s)", jobs[0][0], type(exc).__name__
            )

    async def request_cancel(self, job_id: str) -> CancelDecision:
        """Flag a job cancelled and tell the worker holding it, if any; the flag is one atomic
        decision against the job's end (see `_FLAG_CANCEL`).

        A waiting job is failed as cancelled when a worker takes it (no provider call); a delayed
        one is promoted so that happens now; an active one is interrupted by its worker, or, if
        its call has already answered, ends cancelled with its result discarded.
        """
        if not valid_job_id(job_id):
            raise JobNotFound(job_id)
        key = self.bull.toKey
        with redis_errors_as_unavailable():
            flagged = await self._flag_cancel(
                keys=[key(job_id), key("completed"), key("failed")],
                args=[CANCEL_FIELD, now_ms(), job_id, FINISHING_FIELD],
            )
            if flagged == 0:
                raise JobNotFound(job_id)
            decision = CancelDecision(flagged)
            if decision is not CancelDecision.FLAGGED:
                return decision
            await self.redis.publish(cancel_channel(self.bull.name), job_id)
            if await self.bull.getJobState(job_id) == "delayed":
                with contextlib.suppress(Exception):  # it may have moved on meanwhile
                    await self.bull.backend.promote(job_id)
        return CancelDecision.FLAGGED

    async def pause(self) -> None:
        """Stop workers from taking jobs (benchmarks fill a paused queue)."""
        await self.bull.pause()

    async def resume(self) -> None:
        await self.bull.resume()
        # bullmq's resume wakes idle workers only when `wait` holds jobs; held jobs are in
        # tenant lines, so set BullMQ's "jobs ready" marker for them too.
        await self.redis.zadd(self.bull.toKey("marker"), {"0": 0})

    async def ping(self) -> None:
        with redis_errors_as_unavailable():
            await self.redis.ping()

    async def close(self) -> None:
        await self.bull.close()


@contextlib.asynccontextmanager
async def job_queue(redis: RedisSettings, worker: WorkerSettings) -> AsyncIterator[JobQueue]:
    """A `JobQueue` with its own Redis pool, closed on exit."""
    client = connect(redis)
    queue = JobQueue(client, redis, worker)
    try:
        yield queue
    finally:
        await queue.close()
        await client.aclose()
