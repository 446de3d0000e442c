"""Batches in Redis: one hash a batch (status, counts, enqueue cursor, timestamps), a sorted set
of each tenant's batches, and the set of batches with work left for a driver (`driver.py`).

The hash lives under the queue's BullMQ prefix, beside its jobs, so the tally of a line's end
(`tally.py`) is one script over the job's hash and the batch's. Counts only ever grow through
scripts that check a per-job flag first, so a job counted twice (a finish retried after a lost
reply) counts once.
"""

from __future__ import annotations

import secrets
import time
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, cast

import orjson
from redis.asyncio import Redis

from flow_api.errors import BatchNotFound
from flow_api.keys import BATCH_WORK_SUFFIX, batch_lease_suffix, batch_suffix, tenant_batches_suffix
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.queue.producer import JobQueue


class BatchStatus(StrEnum):
    """OpenAI's batch statuses."""

    VALIDATING = "validating"
    FAILED = "failed"
    IN_PROGRESS = "in_progress"
    FINALIZING = "finalizing"
    COMPLETED = "completed"
    EXPIRED = "expired"
    CANCELLING = "cancelling"
    CANCELLED = "cancelled"

    @property
    def ended(self) -> bool:
        return self in (self.FAILED, self.COMPLETED, self.EXPIRED, self.CANCELLED)


# Shared by the tally and the driver's skip: once every line is queued (`enqueued`) and every
# line ended (`completed` + `failed` = `total`), mark the batch ready for its output, once, and
# put it in the work set for a driver. KEYS[1] batch hash, KEYS[2] work set; now, batch id.
READY = """
local function flowBatchReady(batch, work, now, batchId)
  if redis.call("HGET", batch, "enqueued") ~= "1" then return 0 end
  local total = tonumber(redis.call("HGET", batch, "total") or "0")
  local done = tonumber(redis.call("HGET", batch, "completed") or "0")
    + tonumber(redis.call("HGET", batch, "failed") or "0")
  if done < total then return 0 end
  if redis.call("HSETNX", batch, "ready", now) == 1 then
    if redis.call("HGET", batch, "status") == "in_progress" then
      redis.call("HSET", batch, "status", "finalizing", "finalizing_at", now)
    end
    redis.call("ZADD", work, 0, batchId)
  end
  return 1
end
"""

# The lines a cancel left unqueued count as failed at once, and the enqueue is over.
# KEYS: batch, work set. ARGV: how many, now, batch id, the cursor past them.
_SKIP_REST = (
    READY
    + """
if redis.call("HGET", KEYS[1], "enqueued") == "1" then return 0 end
redis.call("HINCRBY", KEYS[1], "failed", tonumber(ARGV[1]))
redis.call("HSET", KEYS[1], "cursor", ARGV[4], "enqueued", "1")
return flowBatchReady(KEYS[1], KEYS[2], ARGV[2], ARGV[3])
"""
)

# A line refused at enqueue (the key's token quota) counts as failed, once: the enqueue of its
# chunk may run again after a crash. KEYS: batch, refused lines. ARGV: line, error JSON.
_REFUSE = """
if redis.call("HSETNX", KEYS[2], ARGV[1], ARGV[2]) == 1 then
  redis.call("HINCRBY", KEYS[1], "failed", 1)
end
return 1
"""

# The last chunk is queued: from now on the tally may find the batch done (perhaps already);
# until then a driver only looks again after the reconcile delay (a job that ended without the
# tally, such as when its worker died between the two, is counted then).
# KEYS: batch, work set. ARGV: now (s), batch id, cursor, the next look (ms).
_ENQUEUED = (
    READY
    + """
redis.call("HSET", KEYS[1], "enqueued", "1", "cursor", ARGV[3])
local ready = flowBatchReady(KEYS[1], KEYS[2], ARGV[1], ARGV[2])
if ready == 0 and redis.call("HGET", KEYS[1], "status") == "in_progress" then
  redis.call("ZADD", KEYS[2], ARGV[4], ARGV[2])
end
return ready
"""
)

# A driver finished its work on the batch: next look after the reconcile delay, unless it
# became ready (the tally put it back for its output) meanwhile, or ended.
# KEYS: batch, work set. ARGV: batch id, the next look (ms).
_SETTLE = """
local status = redis.call("HGET", KEYS[1], "status")
if not status or status == "completed" or status == "failed" or status == "expired"
   or status == "cancelled" then
  redis.call("ZREM", KEYS[2], ARGV[1])
elseif not redis.call("HGET", KEYS[1], "ready") then
  redis.call("ZADD", KEYS[2], ARGV[2], ARGV[1])
end
return 1
"""

# A cancel: only a batch that has not ended; the driver then stops queueing and cancels jobs.
# KEYS: batch, work set. ARGV: now, batch id. 0: unknown; 1: cancelling; 2: already ended.
_CANCEL = """
local status = redis.call("HGET", KEYS[1], "status")
if not status then return 0 end
if status == "completed" or status == "failed" or status == "expired" or status == "cancelled" then
  return 2
end
if status ~= "cancelling" then
  redis.call("HSET", KEYS[1], "status", "cancelling", "cancelling_at", ARGV[1])
  redis.call("ZADD", KEYS[2], 0, ARGV[2])
end
return 1
"""

# The validation passed: `in_progress`, unless a cancel came meanwhile (it stays `cancelling`,
# now with its total). KEYS: batch. ARGV: now, total. 1: started; 0: cancelled meanwhile.
_START = """
redis.call("HSET", KEYS[1], "total", ARGV[2])
if redis.call("HGET", KEYS[1], "status") ~= "validating" then return 0 end
redis.call("HSET", KEYS[1], "status", "in_progress", "in_progress_at", ARGV[1])
return 1
"""

# Give a lease up, only if this driver holds it. KEYS: lease. ARGV: token.
_RELEASE = """
if redis.call("GET", KEYS[1]) == ARGV[1] then return redis.call("DEL", KEYS[1]) end
return 0
"""

# Renew a lease only while this driver holds it. KEYS: lease. ARGV: token, ms.
_RENEW = """
if redis.call("GET", KEYS[1]) == ARGV[1] then
  return redis.call("PEXPIRE", KEYS[1], ARGV[2])
end
return 0
"""

_TIMES = (
    "created_at",
    "in_progress_at",
    "expires_at",
    "finalizing_at",
    "completed_at",
    "failed_at",
    "expired_at",
    "cancelling_at",
    "cancelled_at",
)


def new_batch_id() -> str:
    return f"batch_{secrets.token_hex(12)}"


def now_s() -> int:
    return int(time.time())


def _now_ms() -> int:
    return int(time.time() * 1000)


@dataclass(frozen=True, slots=True)
class BatchRecord:
    """A batch as stored: what `Batch` answers, plus the driver's own fields."""

    id: str
    tenant: str
    status: BatchStatus
    input_file_id: str
    completion_window: str
    times: dict[str, int]
    total: int
    completed: int
    failed: int
    cursor: int
    enqueued: bool
    ready: bool
    cancel_sent: bool
    key_id: str | None
    tokens_per_day: int
    metadata: dict[str, str] | None = None
    errors: list[dict[str, Any]] | None = None
    output_file_id: str | None = None
    error_file_id: str | None = None
    extra: dict[str, str] = field(default_factory=dict)

    @classmethod
    def parse(cls, batch_id: str, raw: dict[str, str]) -> BatchRecord:
        return cls(
            id=batch_id,
            tenant=raw["tenant"],
            status=BatchStatus(raw["status"]),
            input_file_id=raw["input_file_id"],
            completion_window=raw.get("completion_window", "24h"),
            times={name: int(raw[name]) for name in _TIMES if raw.get(name)},
            total=int(raw.get("total") or 0),
            completed=int(raw.get("completed") or 0),
            failed=int(raw.get("failed") or 0),
            cursor=int(raw.get("cursor") or 0),
            enqueued=raw.get("enqueued") == "1",
            ready=bool(raw.get("ready")),
            cancel_sent=raw.get("cancel_sent") == "1",
            key_id=raw.get("key_id") or None,
            tokens_per_day=int(raw.get("tokens_per_day") or 0),
            metadata=orjson.loads(raw["metadata"]) if raw.get("metadata") else None,
            errors=orjson.loads(raw["errors"]) if raw.get("errors") else None,
            output_file_id=raw.get("output_file_id") or None,
            error_file_id=raw.get("error_file_id") or None,
        )

    def wire(self) -> dict[str, Any]:
        """OpenAI's `Batch` object."""
        body: dict[str, Any] = {
            "id": self.id,
            "object": "batch",
            "endpoint": "/v1/chat/completions",
            "errors": None if self.errors is None else {"object": "list", "data": self.errors},
            "input_file_id": self.input_file_id,
            "completion_window": self.completion_window,
            "status": self.status.value,
            "output_file_id": self.output_file_id,
            "error_file_id": self.error_file_id,
            "request_counts": {
                "total": self.total,
                "completed": self.completed,
                "failed": self.failed,
            },
            "metadata": self.metadata,
            # Ours, beside OpenAI's fields: lines queued as jobs so far (the CLI's "in flight"
            # is this less the lines ended).
            "lines_queued": self.cursor,
        }
        for name in _TIMES:
            body[name] = self.times.get(name)
        return body


class BatchStore:
    """Create, read, list and move batches; every key under the queue's BullMQ prefix."""

    def __init__(self, queue: JobQueue, retention_s: int, reconcile_s: float = 60.0) -> None:
        self.redis: Redis = queue.redis
        self.reconcile_ms = int(reconcile_s * 1000)
        self.key = queue.bull.toKey
        self.retention_s = retention_s
        self._skip_rest = self.redis.register_script(_SKIP_REST)
        self._refuse = self.redis.register_script(_REFUSE)
        self._enqueued = self.redis.register_script(_ENQUEUED)
        self._cancel = self.redis.register_script(_CANCEL)
        self._renew = self.redis.register_script(_RENEW)
        self._settle = self.redis.register_script(_SETTLE)
        self._start = self.redis.register_script(_START)
        self._release = self.redis.register_script(_RELEASE)

    @property
    def work_key(self) -> str:
        return str(self.key(BATCH_WORK_SUFFIX))

    async def create(
        self,
        *,
        tenant: str,
        input_file_id: str,
        completion_window: str,
        metadata: dict[str, str] | None,
        key_id: str | None,
        tokens_per_day: int,
        window_s: int,
    ) -> BatchRecord:
        batch_id = new_batch_id()
        now = now_s()
        fields: dict[str, str | int] = {
            "tenant": tenant,
            "status": BatchStatus.VALIDATING.value,
            "input_file_id": input_file_id,
            "completion_window": completion_window,
            "created_at": now,
            "expires_at": now + window_s,
            "tokens_per_day": tokens_per_day,
        }
        if metadata is not None:
            fields["metadata"] = orjson.dumps(metadata).decode()
        if key_id is not None:
            fields["key_id"] = key_id
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(self.key(batch_suffix(batch_id)), mapping=cast(Any, fields))
                pipe.zadd(self.key(tenant_batches_suffix(tenant)), {batch_id: now * 1000})
                pipe.zadd(self.work_key, {batch_id: 0})
                await pipe.execute()
        return await self.get(batch_id, tenant)

    async def get(self, batch_id: str, tenant: str | None = None) -> BatchRecord:
        """The batch; `BatchNotFound` when unknown, expired, or another tenant's."""
        if not batch_id.startswith("batch_") or len(batch_id) > 64:
            raise BatchNotFound(batch_id)
        with redis_errors_as_unavailable():
            raw = cast(dict[str, str], await self.redis.hgetall(self.key(batch_suffix(batch_id))))
        if not raw or (tenant is not None and raw.get("tenant") != tenant):
            raise BatchNotFound(batch_id)
        return BatchRecord.parse(batch_id, raw)

    async def page(
        self, tenant: str, after: str | None, limit: int
    ) -> tuple[list[BatchRecord], bool]:
        """Newest first, after the batch `after`; and whether more follow."""
        key = self.key(tenant_batches_suffix(tenant))
        start = 0
        with redis_errors_as_unavailable():
            if after is not None:
                rank = cast(int | None, await self.redis.zrevrank(key, after))
                if rank is None:
                    return [], False
                start = rank + 1
            found: list[BatchRecord] = []
            while len(found) < limit + 1:
                ids = cast(list[str], await self.redis.zrevrange(key, start, start + limit))
                if not ids:
                    break
                start += len(ids)
                for batch_id in ids:
                    try:
                        found.append(await self.get(batch_id, tenant))
                    except BatchNotFound:  # ended and expired: drop its entry
                        await self.redis.zrem(key, batch_id)
        return found[:limit], len(found) > limit

    async def update(self, batch_id: str, **fields: str | int) -> None:
        with redis_errors_as_unavailable():
            await self.redis.hset(self.key(batch_suffix(batch_id)), mapping=cast(Any, fields))

    async def refuse(self, batch_id: str, line: int, error: dict[str, Any]) -> None:
        """Record why line `line` was refused at enqueue (it then counts as failed, once)."""
        key = self.key(batch_suffix(batch_id))
        with redis_errors_as_unavailable():
            await self._refuse(
                keys=[key, f"{key}:refused"], args=[line, orjson.dumps(error).decode()]
            )

    async def refusal(self, batch_id: str, line: int) -> dict[str, Any] | None:
        with redis_errors_as_unavailable():
            raw = await self.redis.hget(self.key(f"{batch_suffix(batch_id)}:refused"), str(line))
        return None if raw is None else dict(orjson.loads(raw))

    async def end(self, batch_id: str, status: BatchStatus, **fields: str | int) -> None:
        """The batch's last move: its status and time, a TTL, and out of the work set."""
        key = self.key(batch_suffix(batch_id))
        stamp = {
            BatchStatus.FAILED: "failed_at",
            BatchStatus.COMPLETED: "completed_at",
            BatchStatus.EXPIRED: "expired_at",
            BatchStatus.CANCELLED: "cancelled_at",
        }[status]
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=True) as pipe:
                ended: dict[str, str | int] = {"status": status.value, stamp: now_s(), **fields}
                pipe.hset(key, mapping=cast(Any, ended))
                pipe.expire(key, self.retention_s)
                pipe.expire(f"{key}:refused", self.retention_s)
                pipe.zrem(self.work_key, batch_id)
                await pipe.execute()

    async def start(self, batch_id: str, total: int) -> None:
        """The batch validated: `in_progress` with `total` lines (unless cancelled meanwhile)."""
        with redis_errors_as_unavailable():
            await self._start(keys=[self.key(batch_suffix(batch_id))], args=[now_s(), total])

    async def skip_rest(self, batch_id: str, count: int, cursor: int) -> None:
        with redis_errors_as_unavailable():
            await self._skip_rest(
                keys=[self.key(batch_suffix(batch_id)), self.work_key],
                args=[count, now_s(), batch_id, cursor],
            )

    async def mark_enqueued(self, batch_id: str, cursor: int) -> None:
        with redis_errors_as_unavailable():
            await self._enqueued(
                keys=[self.key(batch_suffix(batch_id)), self.work_key],
                args=[now_s(), batch_id, cursor, _now_ms() + self.reconcile_ms],
            )

    async def cancel(self, batch_id: str, tenant: str) -> bool:
        """Ask to cancel; False when the batch already ended."""
        await self.get(batch_id, tenant)
        with redis_errors_as_unavailable():
            reply = await self._cancel(
                keys=[self.key(batch_suffix(batch_id)), self.work_key], args=[now_s(), batch_id]
            )
        if reply == 0:
            raise BatchNotFound(batch_id)
        return bool(reply == 1)

    async def due(self, count: int) -> list[str]:
        """Batches with driver work due now."""
        with redis_errors_as_unavailable():
            ids = cast(
                list[str],
                await self.redis.zrangebyscore(
                    self.work_key, "-inf", _now_ms(), start=0, num=count
                ),
            )
        return ids

    async def settle_work(self, batch_id: str) -> None:
        """Nothing left for a driver until the tally marks it ready, a cancel, or the next
        reconcile."""
        with redis_errors_as_unavailable():
            await self._settle(
                keys=[self.key(batch_suffix(batch_id)), self.work_key],
                args=[batch_id, _now_ms() + self.reconcile_ms],
            )

    async def lease(self, batch_id: str, token: str, ms: int) -> bool:
        with redis_errors_as_unavailable():
            return bool(
                await self.redis.set(self.key(batch_lease_suffix(batch_id)), token, nx=True, px=ms)
            )

    async def renew(self, batch_id: str, token: str, ms: int) -> bool:
        with redis_errors_as_unavailable():
            return bool(
                await self._renew(keys=[self.key(batch_lease_suffix(batch_id))], args=[token, ms])
            )

    async def release(self, batch_id: str, token: str) -> None:
        with redis_errors_as_unavailable():
            await self._release(keys=[self.key(batch_lease_suffix(batch_id))], args=[token])
