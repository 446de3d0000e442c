"""A tenant's jobs, newest first: the index written at submit, paged with an opaque cursor.

Each tenant has one sorted set (`keys.job_index_key`) whose members are
`<created ms, 13 digits>:<jobId>`, all with score 0: Redis orders them by their bytes, so by
creation time, then by id. A cursor is the last member a page looked at; the next page reads
strictly below it (`ZREVRANGEBYLEX`). Jobs submitted meanwhile sort above every cursor already
handed out, so paging never repeats or skips a job, however many are inserted during it.

Filters (status, `createdAfter`, metadata) are applied to the jobs' records as they are read:
a page reads at most `_SCAN_PAGES` times its size of candidates, so a filter that matches
rarely answers a short (even empty) page with a cursor to go on from, rather than a slow one.
Entries are trimmed at insert once older than twice the job retention (a job is kept for the
retention after it *ends*); ids whose job is gone are skipped and dropped from the index.
"""

from __future__ import annotations

import base64
import binascii
import re
from collections import Counter, defaultdict
from collections.abc import Mapping
from dataclasses import dataclass, field

import orjson
from redis.asyncio import Redis

from flow_api.errors import InvalidRequest
from flow_api.history import JobHistory
from flow_api.jobs import now_ms
from flow_api.keys import job_index_key
from flow_api.models import JobStatus, JobView
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.queue.store import JobStore, StoredJob
from flow_api.settings import Settings

_MEMBER = re.compile(r"\d{13}:[0-9a-f]{32}")
_SCAN_PAGES = 10
_MIN_SCAN = 200
_COUNT_BATCH = 500


class InvalidCursor(InvalidRequest):
    code = "invalid_cursor"


def _member(created_ms: int, job_id: str) -> str:
    return f"{created_ms:013d}:{job_id}"


def encode_cursor(member: str) -> str:
    return base64.urlsafe_b64encode(member.encode()).decode().rstrip("=")


def decode_cursor(cursor: str) -> str:
    """The index member a cursor stands for; raises `InvalidCursor` for one we did not make."""
    try:
        member = base64.urlsafe_b64decode(cursor + "=" * (-len(cursor) % 4)).decode()
    except (binascii.Error, UnicodeDecodeError, ValueError):
        member = ""
    if _MEMBER.fullmatch(member) is None:
        raise InvalidCursor("cursor is not one this service answered with", field="cursor")
    return member


@dataclass(frozen=True, slots=True)
class JobFilter:
    """What a listed job must match; an empty filter matches every job."""

    status: JobStatus | None = None
    created_after_ms: int | None = None
    metadata: Mapping[str, str] = field(default_factory=dict)

    def matches(self, history: JobHistory) -> bool:
        if self.status is not None and history.status is not self.status:
            return False
        if not self.metadata:
            return True
        stored = history.job.data.metadata or {}
        return all(
            name in stored and _same(stored[name], value) for name, value in self.metadata.items()
        )


def _same(stored: object, wanted: str) -> bool:
    """`metadata.n=3` matches the string "3" and the number 3 (query strings have no types)."""
    if isinstance(stored, str):
        return stored == wanted
    return orjson.dumps(stored).decode() == wanted


@dataclass(frozen=True, slots=True)
class JobPage:
    jobs: list[JobView]
    next_cursor: str | None


@dataclass(slots=True)
class QueueCounts:
    """A tenant's jobs by status, overall and per provider (newest `limit` jobs)."""

    states: Counter[str] = field(default_factory=Counter)
    providers: defaultdict[str, Counter[str]] = field(default_factory=lambda: defaultdict(Counter))
    counted: int = 0
    complete: bool = True


class JobIndex:
    """Writes and reads the per-tenant job index."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self._prefix = settings.redis.prefix
        self._queue = settings.redis.queue_name
        self.keep_ms = 2 * settings.worker.retention_s * 1000
        self.count_limit = settings.stream.count_limit

    def key(self, tenant: str) -> str:
        return job_index_key(self._prefix, self._queue, tenant)

    async def add(self, tenant: str, job_id: str, created_ms: int | None = None) -> None:
        """Index a job just queued (one round trip; old entries trimmed on the way)."""
        now = now_ms() if created_ms is None else created_ms
        key = self.key(tenant)
        pipe = self.redis.pipeline(transaction=False)
        pipe.zadd(key, {_member(now, job_id): 0})
        pipe.zremrangebylex(key, "-", f"({_member(now - self.keep_ms, '')}")
        pipe.pexpire(key, self.keep_ms)
        with redis_errors_as_unavailable():
            await pipe.execute()

    async def page(
        self,
        store: JobStore,
        tenant: str,
        wanted: JobFilter,
        limit: int,
        cursor: str | None = None,
    ) -> JobPage:
        """Up to `limit` of the tenant's jobs matching `wanted`, newest first, below `cursor`."""
        key = self.key(tenant)
        high = f"({decode_cursor(cursor)}" if cursor else "+"
        low = "-"
        if wanted.created_after_ms is not None:
            low = f"({_member(wanted.created_after_ms, 'f' * 32)}"
        budget = max(_MIN_SCAN, limit * _SCAN_PAGES)
        jobs: list[JobView] = []
        last: str | None = None
        while budget > 0:
            batch = min(budget, max(limit - len(jobs), 1) * 2)
            members = await self._members(key, high, low, batch)
            if not members:
                return JobPage(jobs, None)  # nothing older: the last page
            budget -= len(members)
            found = await self._jobs(store, key, tenant, members)
            for member, job in zip(members, found, strict=True):
                last = member
                if job is not None and wanted.matches(history := JobHistory(job)):
                    jobs.append(history.view)
                    if len(jobs) == limit:
                        return JobPage(jobs, encode_cursor(member))
            if len(members) < batch:
                return JobPage(jobs, None)
            high = f"({last}"
        return JobPage(jobs, encode_cursor(last) if last else None)

    async def counts(self, store: JobStore, tenant: str) -> QueueCounts:
        """The tenant's newest `FLOW_STREAM_COUNT_LIMIT` jobs counted by status and provider."""
        key = self.key(tenant)
        counts = QueueCounts()
        high = "+"
        while counts.counted < self.count_limit:
            batch = min(_COUNT_BATCH, self.count_limit - counts.counted)
            members = await self._members(key, high, "-", batch)
            for job in await self._jobs(store, key, tenant, members):
                if job is None:
                    continue
                status = JobHistory(job).status.value
                counts.states[status] += 1
                counts.providers[job.data.provider or "default"][status] += 1
                counts.counted += 1
            if len(members) < batch:
                return counts
            high = f"({members[-1]}"
        counts.complete = False
        return counts

    async def _members(self, key: str, high: str, low: str, count: int) -> list[str]:
        """Up to `count` index members from `high` down to `low` (lexical bounds)."""
        with redis_errors_as_unavailable():
            return [str(m) for m in await self.redis.zrevrangebylex(key, high, low, 0, count)]

    async def _jobs(
        self, store: JobStore, key: str, tenant: str, members: list[str]
    ) -> list[StoredJob | None]:
        jobs = await store.fetch_many([m[14:] for m in members], tenant=tenant)
        gone = [m for m, job in zip(members, jobs, strict=True) if job is None]
        if gone:  # removed by retention (or never ours): not listed again
            with redis_errors_as_unavailable():
                await self.redis.zrem(key, *gone)
        return jobs
