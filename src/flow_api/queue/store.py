"""The read side of the queue: one stored job, read in one atomic snapshot, with BullMQ's states
in our names."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from bullmq import Job

from flow_api.errors import FlowError, JobNotFound
from flow_api.jobs import DEFAULT_TENANT, JobData
from flow_api.keys import CANCEL_FIELD, STARTED_FIELD
from flow_api.models import JobStatus
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.queue.producer import JobQueue, valid_job_id

# One snapshot of a job: its hash, its state and (when asked, or when it failed: a failure's
# reason is in its last attempt's log line) its log, in one atomic script. Read in separate
# round trips, a job finishing between them was reported with the new state and the old data
# ("completed" with 0 attempts and no result). Only the states that have a status of their own
# are told apart; every other one (wait, delayed, prioritized, paused...) is `waiting`.
# KEYS: job hash, completed, failed, active, logs. ARGV: job id, with logs ("1" or "0"), and
# the reader's tenant (or "") with the tenant of jobs that name none: another tenant's job is
# answered as an unknown id is, without its data leaving Redis (a 404 that costs the API the
# same work whether the id exists or not).
_SNAPSHOT = """
if ARGV[3] ~= "" then
  local data = redis.call("HGET", KEYS[1], "data")
  if not data then return {} end
  local ok, decoded = pcall(cjson.decode, data)
  local tenant = ARGV[4]
  if ok and type(decoded) == "table" and decoded["tenant"] ~= nil then
    tenant = decoded["tenant"]
  end
  if tenant ~= ARGV[3] then return {} end
end
local hash = redis.call("HGETALL", KEYS[1])
if #hash == 0 then return {} end
local state = "waiting"
if redis.call("ZSCORE", KEYS[2], ARGV[1]) then
  state = "completed"
elseif redis.call("ZSCORE", KEYS[3], ARGV[1]) then
  state = "failed"
elseif redis.call("LPOS", KEYS[4], ARGV[1]) then
  state = "active"
end
local logs = {}
if ARGV[2] == "1" or state == "failed" then logs = redis.call("LRANGE", KEYS[5], 0, -1) end
return {hash, state, logs}
"""


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job as read back from Redis, in BullMQ's terms but our names."""

    id: str
    state: JobStatus
    """Where BullMQ has the job: waiting, active, completed or failed (not yet what a client
    is told: a cancel or a missed deadline shows before a worker acts, see `history`)."""
    data: JobData
    created_ms: int
    started_ms: int | None
    finished_ms: int | None
    attempts_made: int
    failed_reason: str | None
    return_value: Any
    log_lines: list[str]
    cancel_requested_ms: int | None = None
    attempt_started_ms: int | None = None
    """When an attempt of the job first started (its provider call could begin), if one did."""


class JobStore:
    """Reads jobs back from the queue the API writes to."""

    def __init__(self, queue: JobQueue) -> None:
        self.bull = queue.bull
        self.redis = queue.redis
        self._snapshot = queue.redis.register_script(_SNAPSHOT)

    async def exists(self, job_id: str) -> bool:
        """Whether the job is stored (queued, running or finished and not yet removed)."""
        if not valid_job_id(job_id):
            return False
        with redis_errors_as_unavailable():
            return bool(await self.redis.exists(self.bull.toKey(job_id)))

    async def fetch(
        self, job_id: str, *, with_logs: bool = False, tenant: str | None = None
    ) -> StoredJob:
        """Read one job as it was at one instant; raises `JobNotFound` for unknown (or expired)
        ids, for jobs whose data is not a job of ours (another producer's), and, when `tenant`
        is given, for another tenant's jobs (checked inside Redis)."""
        if not valid_job_id(job_id):
            raise JobNotFound(job_id)
        with redis_errors_as_unavailable():
            reply = await self._read(job_id, with_logs, tenant)
        job = self._stored(job_id, reply)
        if job is None:
            raise JobNotFound(job_id)
        return job

    async def fetch_many(
        self, job_ids: Sequence[str], *, tenant: str | None = None
    ) -> list[StoredJob | None]:
        """`fetch` for many jobs in one round trip; None for each one `fetch` would not find."""
        pipe = self.redis.pipeline(transaction=False)
        for job_id in job_ids:
            await self._read(job_id, False, tenant, pipe)
        with redis_errors_as_unavailable():
            replies = await pipe.execute()
        return [self._stored(i, r) for i, r in zip(job_ids, replies, strict=True)]

    async def _read(
        self, job_id: str, with_logs: bool, tenant: str | None, client: Any = None
    ) -> Any:
        key = self.bull.toKey
        return await self._snapshot(
            keys=[
                key(job_id),
                key("completed"),
                key("failed"),
                key("active"),
                key(f"{job_id}:logs"),
            ],
            args=[job_id, "1" if with_logs else "0", tenant or "", DEFAULT_TENANT],
            client=client,
        )

    def _stored(self, job_id: str, reply: Any) -> StoredJob | None:
        if not reply:
            return None
        flat, state, lines = reply
        raw = dict(zip(flat[::2], flat[1::2], strict=True))
        job = Job.fromJSON(self.bull, raw, job_id)
        try:
            data = JobData.parse(job.data)
        except FlowError:
            return None
        return StoredJob(
            id=job_id,
            state=JobStatus(state),
            data=data,
            created_ms=job.timestamp,
            started_ms=getattr(job, "processedOn", None),
            finished_ms=getattr(job, "finishedOn", None),
            attempts_made=job.attemptsMade,
            failed_reason=getattr(job, "failedReason", None),
            return_value=job.returnvalue,
            log_lines=list(lines),
            cancel_requested_ms=int(raw[CANCEL_FIELD]) if raw.get(CANCEL_FIELD) else None,
            attempt_started_ms=int(raw[STARTED_FIELD]) if raw.get(STARTED_FIELD) else None,
        )
