"""`history.py`: what a client is told about a stored job, from BullMQ's state and the log lines
workers wrote (written and read by the same module)."""

from __future__ import annotations

import orjson

from flow_api import history
from flow_api.errors import JobExpired, ProviderAuthFailed, ProviderUnavailable
from flow_api.jobs import JobData, now_ms
from flow_api.models import GenerateRequest, JobStatus
from flow_api.queue.store import StoredJob

DATA = JobData.submitted(
    GenerateRequest.model_validate({"prompt": "hi", "options": {"metadata": {"run": 7}}}),
    provider="fake",
    model="echo",
    tenant="default",
)


def stored(state: JobStatus, *entries: dict[str, object], **fields: object) -> StoredJob:
    values: dict[str, object] = {
        "id": "a" * 32,
        "state": state,
        "data": DATA,
        "created_ms": 1_000,
        "started_ms": None,
        "finished_ms": None,
        "attempts_made": 0,
        "failed_reason": None,
        "return_value": None,
        "log_lines": [orjson.dumps(e).decode() for e in entries],
    }
    values.update(fields)
    return StoredJob(**values)  # type: ignore[arg-type]


def test_a_failed_job_reports_its_last_attempts_typed_error() -> None:
    job = stored(
        JobStatus.FAILED,
        history.attempt_started(1, "fake", "echo"),
        history.attempt_ended(1, ProviderUnavailable("down")),
        history.attempt_started(2, "fake", "echo"),
        history.attempt_ended(2, ProviderAuthFailed("bad key")),
        attempts_made=2,
        finished_ms=5_000,
    )
    view = history.JobHistory(job).view
    assert view.status is JobStatus.FAILED
    assert view.error is not None
    assert (view.error.code, view.error.attempts, view.error.retryable) == (
        "provider_auth_failed",
        2,
        False,
    )
    record = history.JobHistory(job).record()
    assert [a.error.code if a.error else None for a in record.attempts] == [
        "provider_unavailable",
        "provider_auth_failed",
    ]
    assert record.logs[-1].message == "attempt 2 failed: provider_auth_failed: bad key"


def test_an_expiry_recorded_by_a_worker_shows_as_expired() -> None:
    job = stored(
        JobStatus.FAILED,
        history.attempt_ended(1, JobExpired("late")),
        attempts_made=1,
        finished_ms=2_000,
    )
    assert history.JobHistory(job).status is JobStatus.EXPIRED


def test_a_failure_with_no_attempt_line_falls_back_to_bullmqs_reason() -> None:
    job = stored(JobStatus.FAILED, failed_reason="boom", attempts_made=1)
    error = history.JobHistory(job).view.error
    assert error is not None and (error.code, error.message) == ("job_failed", "boom")


def test_a_cancel_shows_at_once_on_a_waiting_job() -> None:
    job = stored(JobStatus.WAITING, cancel_requested_ms=3_000)
    view = history.JobHistory(job).view
    assert (view.status, view.finished_at is not None) == (JobStatus.CANCELLED, True)


def test_a_passed_start_deadline_shows_before_a_worker_acts() -> None:
    late = DATA.model_copy(update={"start_by_ms": now_ms() - 1})
    assert history.JobHistory(stored(JobStatus.WAITING, data=late)).status is JobStatus.EXPIRED
    # Taken but not started (waiting for budget): its worker will expire it, so it shows so.
    taken = stored(JobStatus.ACTIVE, data=late)
    assert history.JobHistory(taken).status is JobStatus.EXPIRED
    # Once an attempt has started in time, the deadline no longer applies.
    running = stored(JobStatus.ACTIVE, data=late, attempt_started_ms=now_ms() - 2)
    assert history.JobHistory(running).status is JobStatus.ACTIVE
    # A start written after the deadline is not in time: its worker expires the job at that
    # very start, so it shows expired, never active in between (found by the soak).
    started_late = stored(JobStatus.ACTIVE, data=late, attempt_started_ms=now_ms() + 5)
    assert history.JobHistory(started_late).status is JobStatus.EXPIRED


def test_a_completed_job_has_its_result_and_metadata() -> None:
    generation = {
        "text": "ok",
        "provider": "fake",
        "model": "echo",
        "usage": {"promptTokens": 1, "completionTokens": 1, "totalTokens": 2},
    }
    job = stored(JobStatus.COMPLETED, attempts_made=1, return_value=generation, finished_ms=9)
    result = history.JobHistory(job).result()
    assert result is not None
    assert (result.result.text, result.metadata) == ("ok", {"run": 7})
    assert history.JobHistory(job).view.attempts == 1


def test_an_active_job_counts_the_attempt_in_progress() -> None:
    view = history.JobHistory(stored(JobStatus.ACTIVE, attempts_made=1, started_ms=2)).view
    assert (view.status, view.attempts) == (JobStatus.ACTIVE, 2)


def test_lines_that_are_not_ours_are_kept_as_text() -> None:
    job = stored(JobStatus.WAITING, log_lines=["plain text from another tool"])
    assert [line.message for line in history.JobHistory(job).record().logs] == [
        "plain text from another tool"
    ]
