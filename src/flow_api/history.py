"""A job's execution history: attempt events written as JSON lines in the job's BullMQ log, and
the views (status, result, record) rebuilt from a stored job.

Keeping the history in BullMQ's own per-job log means it expires with the job and other BullMQ
tools (bull-board, Taskforce) show it too. Lines that are not ours are kept as plain log text.
"""

from __future__ import annotations

import os
import socket
import time
from datetime import UTC, datetime
from typing import Any

import orjson
from pydantic import ValidationError

from flow_api.errors import FlowError
from flow_api.models import (
    Attempt,
    ErrorInfo,
    GenerateRequest,
    Generation,
    JobRecord,
    JobStatus,
    JobView,
    LogLine,
    Timings,
)
from flow_api.queue import StoredJob

_STATES = {
    "completed": JobStatus.COMPLETED,
    "failed": JobStatus.FAILED,
    "active": JobStatus.ACTIVE,
}


def now_ms() -> int:
    return int(time.time() * 1000)


WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"


def attempt_started(attempt: int, provider: str, model: str) -> dict[str, Any]:
    return {
        "event": "attempt",
        "at": now_ms(),
        "attempt": attempt,
        "provider": provider,
        "model": model,
        "worker": WORKER_ID,
    }


def attempt_ended(attempt: int, error: FlowError | None) -> dict[str, Any]:
    entry: dict[str, Any] = {"event": "attempt_end", "at": now_ms(), "attempt": attempt}
    if error is not None:
        entry["error"] = {**error.to_dict(), "retryable": error.retryable}
    return entry


def note(message: str) -> dict[str, Any]:
    return {"event": "log", "at": now_ms(), "message": message}


def _when(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def _parse(line: str) -> dict[str, Any]:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        entry = None
    return entry if isinstance(entry, dict) and "event" in entry else {"message": line}


_OUTCOMES = {"cancelled": JobStatus.CANCELLED, "expired": JobStatus.EXPIRED}


def _last_error(job: StoredJob) -> ErrorInfo:
    for entry in reversed([_parse(line) for line in job.log_lines]):
        if entry.get("event") == "attempt_end" and entry.get("error"):
            return ErrorInfo.model_validate({**entry["error"], "attempts": job.attempts_made})
    reason = job.failed_reason or "the job failed"
    return ErrorInfo(code="job_failed", message=reason, attempts=job.attempts_made)


def _deadline_passed(job: StoredJob) -> bool:
    start_by = job.data.get("startBy")
    never_started = job.attempts_made == 0 and job.state != "active"
    return never_started and isinstance(start_by, int) and now_ms() > start_by


def outcome_of(job: StoredJob) -> tuple[JobStatus, ErrorInfo | None]:
    """The job's status as clients see it, and why it did not complete where it did not.

    A cancel or a passed start deadline shows at once, even before a worker has moved the job
    out of BullMQ's wait list (the worker then ends it without calling the provider).
    """
    state = _STATES.get(job.state, JobStatus.WAITING)
    if state is JobStatus.FAILED:
        error = _last_error(job)
        return _OUTCOMES.get(error.code, JobStatus.FAILED), error
    if state is JobStatus.COMPLETED:
        return state, None
    if job.cancel_requested_ms is not None:
        return JobStatus.CANCELLED, ErrorInfo(code="cancelled", message="cancelled by the client")
    if _deadline_passed(job):
        message = "not started before its deadline (startWithinMs)"
        return JobStatus.EXPIRED, ErrorInfo(code="expired", message=message)
    return state, None


def status_of(job: StoredJob) -> JobStatus:
    return outcome_of(job)[0]


def metadata_of(job: StoredJob) -> dict[str, Any] | None:
    options = job.data.get("request", {}).get("options", {})
    meta = options.get("metadata") if isinstance(options, dict) else None
    return meta if isinstance(meta, dict) else None


def view_of(job: StoredJob) -> JobView:
    status, error = outcome_of(job)
    finished_ms = job.finished_ms or job.cancel_requested_ms or job.data.get("startBy")
    return JobView(
        job_id=job.id,
        status=status,
        attempts=job.attempts_made + (1 if status is JobStatus.ACTIVE else 0),
        created_at=_when(job.created_ms) or datetime.now(UTC),
        started_at=_when(job.started_ms),
        finished_at=_when(finished_ms) if status.finished else None,
        error=error,
        metadata=metadata_of(job),
    )


def generation_of(job: StoredJob) -> Generation | None:
    if status_of(job) is not JobStatus.COMPLETED or not isinstance(job.return_value, dict):
        return None
    try:
        return Generation.model_validate(job.return_value)
    except ValidationError:
        return None


def _attempts(entries: list[dict[str, Any]]) -> list[Attempt]:
    """Attempts in start order; a start with no end is one a crash or shutdown cut short."""
    attempts: list[dict[str, Any]] = []
    for entry in entries:
        number = entry.get("attempt")
        if entry.get("event") == "attempt" and isinstance(number, int):
            attempts.append(
                {
                    "attempt": number,
                    "started_at": _when(entry["at"]),
                    "provider": entry.get("provider", ""),
                    "model": entry.get("model", ""),
                    "worker": entry.get("worker"),
                }
            )
        elif entry.get("event") == "attempt_end":
            open_ = [a for a in attempts if a["attempt"] == number and "finished_at" not in a]
            if open_:
                open_[-1]["finished_at"] = _when(entry["at"])
                if entry.get("error"):
                    open_[-1]["error"] = ErrorInfo.model_validate(entry["error"])
    return [Attempt.model_validate(a) for a in attempts]


def _describe(entry: dict[str, Any]) -> str:
    event = entry.get("event")
    if event == "attempt":
        return (
            f"attempt {entry.get('attempt')} started on {entry.get('provider')}/"
            f"{entry.get('model')}"
        )
    if event == "attempt_end":
        error = entry.get("error")
        if error:
            return (
                f"attempt {entry.get('attempt')} failed: {error.get('code')}: "
                f"{error.get('message')}"
            )
        return f"attempt {entry.get('attempt')} succeeded"
    return str(entry.get("message", ""))


def record_of(job: StoredJob) -> JobRecord:
    """The whole history of a job: request, outcome, attempts, logs, timings."""
    entries = [_parse(line) for line in job.log_lines]
    view = view_of(job)
    started = min((e["at"] for e in entries if e.get("event") == "attempt"), default=None)
    started = started or job.started_ms
    finished = job.finished_ms if view.status.finished else None
    return JobRecord(
        job_id=job.id,
        status=view.status,
        request=GenerateRequest.model_validate(job.data.get("request", {})),
        result=generation_of(job),
        error=view.error,
        attempts=_attempts(entries),
        logs=[
            LogLine(at=_when(e.get("at")) or view.created_at, message=_describe(e)) for e in entries
        ],
        timings=Timings(
            queued_at=view.created_at,
            started_at=_when(started),
            finished_at=_when(finished),
            queue_ms=started - job.created_ms if started else None,
            run_ms=finished - started if finished and started else None,
        ),
    )
