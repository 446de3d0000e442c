"""Admission control: the API refuses new jobs while Redis must keep its room for draining.

With `maxmemory-policy noeviction` (the only safe policy for a queue), a Redis at its limit
refuses every write: submits fail, and so does a worker's `moveToActive`, so no job can even
start — the queue is wedged until someone deletes data. Here the API stops first: a submit is
refused with 503 `queue_full` while

    used_memory + unfinished_jobs * FLOW_ADMISSION_DRAIN_BYTES_PER_JOB > watermark * limit

where `limit` is Redis's `maxmemory` (or `FLOW_ADMISSION_MEMORY_BUDGET_BYTES` when it has none)
and `unfinished_jobs` counts waiting (held in tenants' lines too), prioritized, delayed, paused
and active jobs. What stays free at that point is each unfinished job's room to be taken and
finished, plus `1 - watermark` of the limit for everything else (submits racing in other API
processes, keys, fragmentation).
`FLOW_ADMISSION_MAX_UNFINISHED_JOBS` caps the backlog by count as well (or instead).

One reading (`INFO memory` and the queue's list lengths, one pipelined round trip) serves an API
process for `FLOW_ADMISSION_REFRESH_S`, however many submits arrive: concurrent requests share
the one refresh in flight.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections import Counter
from collections.abc import Iterable
from dataclasses import dataclass, replace

from redis.asyncio import Redis

from flow_api.errors import QueueFull
from flow_api.keys import admission_refusals_key
from flow_api.queue.connection import REDIS_TROUBLE, redis_errors_as_unavailable
from flow_api.queue.producer import JobQueue
from flow_api.settings import AdmissionSettings

log = logging.getLogger(__name__)

UNFINISHED_LISTS = ("wait", "paused", "active", "fair:waiting")
"""`fair:waiting` has one entry per job held in its tenant's line (`queue/fair_share.py`)."""
UNFINISHED_SETS = ("prioritized", "delayed")


@dataclass(frozen=True, slots=True)
class QueueRoom:
    """One reading of how full the job store is."""

    used_bytes: int
    limit_bytes: int
    """Redis's `maxmemory`, else the configured budget; 0 when neither is set."""
    limit_source: str
    unfinished_jobs: int

    def refusal(self, settings: AdmissionSettings) -> QueueFull | None:
        """Why a new job must be refused now, or None while there is room."""
        if settings.max_unfinished_jobs and self.unfinished_jobs >= settings.max_unfinished_jobs:
            return QueueFull(
                f"the queue holds {self.unfinished_jobs} unfinished jobs, its limit "
                f"(FLOW_ADMISSION_MAX_UNFINISHED_JOBS) is {settings.max_unfinished_jobs}",
                reason="max_unfinished_jobs",
                retry_after=settings.retry_after_s,
            )
        if not self.limit_bytes:
            return None
        reserved = self.unfinished_jobs * settings.drain_bytes_per_job
        if self.used_bytes + reserved <= settings.watermark * self.limit_bytes:
            return None
        return QueueFull(
            f"Redis memory is {_mb(self.used_bytes)} of its {_mb(self.limit_bytes)} "
            f"{self.limit_source}, and {_mb(reserved)} stay reserved for workers to finish "
            f"{self.unfinished_jobs} unfinished jobs; new jobs are taken again below "
            f"{settings.watermark:.0%} of the limit",
            reason="redis_memory",
            retry_after=settings.retry_after_s,
        )

    def plus(self, jobs: int, job_bytes: int) -> QueueRoom:
        """This reading with `jobs` more unfinished jobs holding `job_bytes` more memory."""
        return replace(
            self,
            used_bytes=self.used_bytes + job_bytes,
            unfinished_jobs=self.unfinished_jobs + jobs,
        )


JOB_OVERHEAD_BYTES = 1280
"""What a waiting job holds beyond its texts (`benchmarks/job_memory.py`: ~1.25 KB with a
100-character prompt)."""


def job_bytes(texts: Iterable[str | None]) -> int:
    """An estimate of the memory a new job holds while it waits: its texts and the overhead."""
    return JOB_OVERHEAD_BYTES + sum(len(text.encode()) for text in texts if text)


def _mb(n: int) -> str:
    return f"{n / 1_048_576:.1f} MB"


async def read_room(redis: Redis, queue: JobQueue, settings: AdmissionSettings) -> QueueRoom:
    """Read the job store's memory and backlog in one round trip."""
    key = queue.bull.toKey
    with redis_errors_as_unavailable():
        async with redis.pipeline(transaction=False) as pipe:
            pipe.info("memory")
            for name in UNFINISHED_LISTS:
                pipe.llen(key(name))
            for name in UNFINISHED_SETS:
                pipe.zcard(key(name))
            memory, *counts = await pipe.execute()
    maxmemory = int(memory.get("maxmemory", 0))
    limit, source = (
        (maxmemory, "maxmemory") if maxmemory else (settings.memory_budget_bytes, "memory budget")
    )
    return QueueRoom(
        used_bytes=int(memory["used_memory"]),
        limit_bytes=limit,
        limit_source=source,
        unfinished_jobs=sum(int(c) for c in counts),
    )


class Admission:
    """Decides whether the API takes a new job, from a reading refreshed at most every
    `settings.refresh_s`; counts refusals per tenant (in Redis and in a log line)."""

    def __init__(self, queue: JobQueue, settings: AdmissionSettings) -> None:
        self.queue = queue
        self.settings = settings
        self._room: QueueRoom | None = None
        self._read_at = -float("inf")
        self._reading: asyncio.Future[QueueRoom] | None = None
        self._closed_since: float | None = None
        self._since_reading = (0, 0)
        """(jobs, bytes) this process admitted since its last reading, added to it: a burst of
        submits within one `refresh_s` cannot carry Redis to its limit (seen: a flood took a
        small Redis from the watermark to `maxmemory`, where lock renewals fail and the queue
        wedged)."""
        self._refused: Counter[str] = Counter()
        self._refusals_key = admission_refusals_key(queue.bull.name)

    async def room(self) -> QueueRoom:
        """The current reading (at most `refresh_s` old)."""
        if self._room is not None and time.monotonic() - self._read_at < self.settings.refresh_s:
            return self._room
        if self._reading is None or self._reading.done():  # one refresh, shared by all waiting
            self._reading = asyncio.ensure_future(self._refresh())
        return await asyncio.shield(self._reading)

    async def _refresh(self) -> QueueRoom:
        # The reading is stored as it completes, before any waiter resumes: a request arriving
        # in between finds it fresh instead of starting another.
        room = await read_room(self.queue.redis, self.queue, self.settings)
        self._room, self._read_at = room, time.monotonic()
        self._since_reading = (0, 0)
        return room

    async def refusal(self) -> QueueFull | None:
        """Why new jobs are refused now (not even the smallest job fits), or None; logs when
        admission closes and reopens."""
        jobs, held = self._since_reading  # and room for one more job, the smallest there is
        room = (await self.room()).plus(jobs + 1, held + JOB_OVERHEAD_BYTES)
        refusal = room.refusal(self.settings)
        if refusal is not None and self._closed_since is None:
            self._closed_since = time.monotonic()
            log.warning("admission closed (%s): %s", refusal.reason, refusal.message)
        elif refusal is None and self._closed_since is not None:
            self._reopened()
        return refusal

    async def admit(self, tenant: str, size: int = JOB_OVERHEAD_BYTES) -> None:
        """Raise `QueueFull` (503) when the job store has no room for another job of `size`
        bytes (`job_bytes`); else count it in until the next reading."""
        refusal = await self.refusal()
        if refusal is None and self._room is not None:
            jobs, held = self._since_reading
            refusal = self._room.plus(jobs + 1, held + size).refusal(self.settings)
            if refusal is None:
                self._since_reading = (jobs + 1, held + size)
        if refusal is None:
            return
        self._refused[tenant] += 1
        # Counted for the metrics to export; a Redis too full even for this must not turn the
        # 503 into something else.
        with contextlib.suppress(*REDIS_TROUBLE):
            await self.queue.redis.hincrby(self._refusals_key, tenant, 1)
        raise refusal

    def _reopened(self) -> None:
        assert self._closed_since is not None
        closed_for = time.monotonic() - self._closed_since
        counts = ", ".join(f"{tenant}: {n}" for tenant, n in self._refused.most_common(10))
        log.warning(
            "admission reopened after %.1f s; %d submits refused (%s)",
            closed_for,
            self._refused.total(),
            counts or "none",
        )
        self._closed_since = None
        self._refused.clear()
