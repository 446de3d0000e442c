"""The read side of the queue: one stored job, with BullMQ's states in our names."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from bullmq import Job

from flow_api.errors import FlowError, JobNotFound
from flow_api.jobs import JobData
from flow_api.keys import CANCEL_FIELD
from flow_api.models import JobStatus
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.queue.producer import JobQueue, valid_job_id

_STATES = {
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "active": JobStatus.ACTIVE,
}
"""BullMQ's states that have a status of their own; every other one (wait, delayed,
prioritized, waiting-children, paused) is `waiting` to a client."""


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


class JobStore:
    """Reads jobs back from the queue the API writes to."""

    def __init__(self, queue: JobQueue) -> None:
        self.bull = queue.bull

    async def fetch(self, job_id: str, *, with_logs: bool = False) -> StoredJob:
        """Read one job; raises `JobNotFound` for unknown (or expired) ids, and for jobs whose
        data is not a job of ours (another producer's, on the same queue)."""
        with redis_errors_as_unavailable():
            raw = await self.bull.backend.getJobData(job_id) if valid_job_id(job_id) else None
            if not raw:
                raise JobNotFound(job_id)
            job = Job.fromJSON(self.bull, raw, job_id)
            try:
                data = JobData.parse(job.data)
            except FlowError:
                raise JobNotFound(job_id) from None
            state = _STATES.get(await self.bull.getJobState(job_id), JobStatus.WAITING)
            lines: list[str] = []
            if with_logs or state is JobStatus.FAILED:  # a failure's reason is in its last attempt
                found = await self.bull.getJobLogs(job_id)
                lines = list(found.get("logs", []))
        return StoredJob(
            id=job_id,
            state=state,
            data=data,
            created_ms=job.timestamp,
            started_ms=getattr(job, "processedOn", None),
            finished_ms=getattr(job, "finishedOn", None),
            attempts_made=job.attemptsMade,
            failed_reason=getattr(job, "failedReason", None),
            return_value=job.returnvalue,
            log_lines=lines,
            cancel_requested_ms=int(raw[CANCEL_FIELD]) if raw.get(CANCEL_FIELD) else None,
        )
