"""A job's history, written and read in this one module.

Written: attempt events as JSON lines in the job's own BullMQ log (`attempt_started`,
`attempt_ended`, `note`). Read: `JobHistory`, built once per request from one stored job, whose
outcome (status and error), view, result and record are each computed once from those lines.

Keeping the history in BullMQ's own per-job log means it expires with the job and other BullMQ
tools (bull-board, Taskforce) show it too. Lines that are not ours are kept as plain log text.
"""

from __future__ import annotations

import os
import socket
from datetime import UTC, datetime
from functools import cached_property
from typing import Any

import orjson
from pydantic import ValidationError

from flow_api.errors import FlowError
from flow_api.jobs import now_ms
from flow_api.models import (
    Attempt,
    ErrorInfo,
    Generation,
    JobRecord,
    JobResult,
    JobStatus,
    JobView,
    LogLine,
    Timings,
    WebhookAttempt,
)
from flow_api.queue.store import StoredJob

WORKER_ID = f"{socket.gethostname()}:{os.getpid()}"
"""This process, as attempts and heartbeats name it."""

# --- written by workers -------------------------------------------------------------------


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


# --- read by the API ----------------------------------------------------------------------

_OUTCOMES = {"cancelled": JobStatus.CANCELLED, "expired": JobStatus.EXPIRED}


def _when(ms: int | None) -> datetime | None:
    return datetime.fromtimestamp(ms / 1000, UTC) if ms else None


def _parse(line: str) -> dict[str, Any]:
    try:
        entry = orjson.loads(line)
    except orjson.JSONDecodeError:
        entry = None
    return entry if isinstance(entry, dict) and "event" in entry else {"message": line}


class JobHistory:
    """What clients are told about one stored job; each part computed at most once."""

    def __init__(self, job: StoredJob) -> None:
        self.job = job

    @cached_property
    def entries(self) -> list[dict[str, Any]]:
        return [_parse(line) for line in self.job.log_lines]

    @cached_property
    def outcome(self) -> tuple[JobStatus, ErrorInfo | None]:
        """The job's status as clients see it, and why it did not complete where it did not.

        A cancel or a passed start deadline shows at once, even before a worker has moved the
        job out of BullMQ's wait list (the worker then ends it without calling the provider).
        """
        job = self.job
        if job.state is JobStatus.FAILED:
            error = self._last_error()
            if job.cancel_requested_ms is not None:
                # A cancel is flagged only on a job that has not ended (`producer`), so this
                # one was cancelled first (then failed by BullMQ itself, e.g. as stalled).
                return JobStatus.CANCELLED, ErrorInfo(
                    code="cancelled", message="cancelled by the client", attempts=error.attempts
                )
            return _OUTCOMES.get(error.code, JobStatus.FAILED), error
        if job.state is JobStatus.COMPLETED:
            return job.state, None
        if job.cancel_requested_ms is not None:
            return JobStatus.CANCELLED, ErrorInfo(
                code="cancelled", message="cancelled by the client"
            )
        # Taken is not started: a job taken past its deadline (waiting for budget, before its
        # attempt starts) is expired by its worker, so it shows expired, never active first.
        # Nor is a start written after the deadline: the worker checks the deadline at that
        # very time (`worker.steps.Gate`) and expires the job, so it shows expired throughout.
        first_start = job.attempt_started_ms
        deadline = job.data.start_by_ms
        started = job.attempts_made > 0 or (
            first_start is not None and (deadline is None or first_start <= deadline)
        )
        if job.data.expired(now_ms(), started_before=started):
            message = "not started before its deadline (startWithinMs)"
            return JobStatus.EXPIRED, ErrorInfo(code="expired", message=message)
        return job.state, None

    @property
    def status(self) -> JobStatus:
        return self.outcome[0]

    def _last_error(self) -> ErrorInfo:
        job = self.job
        for entry in reversed(self.entries):
            if entry.get("event") == "attempt_end" and entry.get("error"):
                return ErrorInfo.model_validate({**entry["error"], "attempts": job.attempts_made})
        reason = job.failed_reason or "the job failed"
        return ErrorInfo(code="job_failed", message=reason, attempts=job.attempts_made)

    @cached_property
    def view(self) -> JobView:
        """`GET /api/ai/status/{jobId}`."""
        job = self.job
        status, error = self.outcome
        finished_ms = job.finished_ms or job.cancel_requested_ms or job.data.start_by_ms
        return JobView(
            job_id=job.id,
            status=status,
            attempts=job.attempts_made + (1 if status is JobStatus.ACTIVE else 0),
            created_at=_when(job.created_ms) or datetime.now(UTC),
            started_at=_when(job.started_ms),
            finished_at=_when(finished_ms) if status.finished else None,
            error=error,
            metadata=job.data.metadata,
        )

    @cached_property
    def generation(self) -> Generation | None:
        """The stored result, when the job completed with one."""
        value = self.job.return_value
        if self.status is not JobStatus.COMPLETED or not isinstance(value, dict):
            return None
        try:
            return Generation.model_validate(value)
        except ValidationError:
            return None

    def result(self) -> JobResult | None:
        """`GET /api/ai/result/{jobId}` once completed with a result; else None."""
        if self.generation is None:
            return None
        view = self.view
        return JobResult(
            job_id=view.job_id, status=view.status, result=self.generation, metadata=view.metadata
        )

    def record(self) -> JobRecord:
        """The whole history of a job: request, outcome, attempts, logs, timings."""
        job, view, entries = self.job, self.view, self.entries
        started = min((e["at"] for e in entries if e.get("event") == "attempt"), default=None)
        started = started or job.started_ms
        finished = job.finished_ms if view.status.finished else None
        return JobRecord(
            job_id=job.id,
            status=view.status,
            request=job.data.request,
            result=self.generation,
            error=view.error,
            attempts=_attempts(entries),
            logs=[
                LogLine(at=_when(e.get("at")) or view.created_at, message=_describe(e))
                for e in entries
            ],
            timings=Timings(
                queued_at=view.created_at,
                started_at=_when(started),
                finished_at=_when(finished),
                queue_ms=started - job.created_ms if started else None,
                run_ms=finished - started if finished and started else None,
            ),
            webhooks=_webhook_attempts(entries) if job.data.webhook is not None else None,
        )


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


_WEBHOOK_FIELDS = frozenset(
    ("eventId", "type", "attempt", "statusCode", "error", "durationMs", "delivered")
)


def _webhook_attempts(entries: list[dict[str, Any]]) -> list[WebhookAttempt]:
    """Delivery attempts of the job's webhook event (`webhooks.delivery` writes them)."""
    found = []
    for entry in entries:
        if entry.get("event") != "webhook":
            continue
        try:
            fields = {k: v for k, v in entry.items() if k in _WEBHOOK_FIELDS}
            found.append(WebhookAttempt.model_validate({**fields, "at": _when(entry.get("at"))}))
        except ValidationError:  # a line from another version: shown in the logs only
            continue
    return found


def _describe(entry: dict[str, Any]) -> str:
    event = entry.get("event")
    if event == "webhook":
        outcome = "delivered" if entry.get("delivered") else entry.get("error", "failed")
        return f"webhook {entry.get('eventId')} attempt {entry.get('attempt')}: {outcome}"
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
