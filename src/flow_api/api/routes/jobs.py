"""Reading jobs back: status, result, and the whole record; cancelling them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flow_api.api.auth import ReaderDep, WriterDep
from flow_api.api.deps import QueueDep, StoreDep
from flow_api.api.errors import error_response
from flow_api.api.responses import errors
from flow_api.auth.principal import Principal, Scope, ensure_owner
from flow_api.errors import JobAlreadyFinished
from flow_api.history import JobHistory
from flow_api.models import CancelledJob, JobRecord, JobResult, JobStatus, JobView
from flow_api.queue.producer import CancelDecision, JobQueue
from flow_api.queue.store import JobStore

router = APIRouter(prefix="/api/ai", tags=["jobs"])

_PENDING: dict[int | str, dict[str, Any]] = {
    202: {"model": JobView, "description": "not finished yet; poll again (see Retry-After)"},
    **errors(
        401,
        403,
        404,
        409,
        503,
        s409="ended without a result: `job_failed`, `job_cancelled` or `job_expired`; "
        "`error.cause` says why",
    ),
}
_READ = errors(401, 403, 404, 503)
_CANCEL = errors(401, 403, 404, 409, 503, s409="`job_already_finished`: nothing left to cancel")


async def _history(
    store: JobStore, job_id: str, principal: Principal, *, with_logs: bool = False
) -> JobHistory:
    job = await store.fetch(job_id, with_logs=with_logs, tenant=principal.tenant)
    return JobHistory(ensure_owner(job, principal))


@router.get(
    "/status/{job_id}", response_model=JobView, response_model_exclude_none=True, responses=_READ
)
async def status(job_id: str, store: StoreDep, principal: ReaderDep) -> JobView:
    """Where a job is: waiting, active, completed or failed, with attempts and timings."""
    return (await _history(store, job_id, principal)).view


@router.get(
    "/result/{job_id}",
    response_model=JobResult,
    response_model_exclude_none=True,
    responses=_PENDING,
)
async def result(job_id: str, store: StoreDep, principal: ReaderDep) -> JobResult | JSONResponse:
    """200 with the generation once completed; 202 while pending; 409 when it ended without."""
    history = await _history(store, job_id, principal)
    answer = history.result()
    if answer is not None:
        return answer
    view = history.view
    if view.status.finished:
        cause = view.error.wire() if view.error else None
        reason = view.error.message if view.error else "no result"
        return error_response(
            409,
            f"job_{view.status.value}",
            f"the job is {view.status.value}: {reason}",
            {"cause": cause, "jobId": job_id, "status": view.status.value},
        )
    return JSONResponse(view.wire(), status_code=202, headers={"Retry-After": "1"})


@router.post(
    "/jobs/{job_id}/cancel",
    response_model=JobView | CancelledJob,
    response_model_exclude_none=True,
    responses=_CANCEL,
)
async def cancel(
    job_id: str, queue: QueueDep, store: StoreDep, principal: WriterDep
) -> JobView | CancelledJob:
    """Cancel a waiting or active job (on whichever worker holds it; its provider call is
    aborted). 409 `job_already_finished` when it already completed, failed, expired or was
    cancelled. The cancel and the job's end are one atomic decision: a 200 means the job ends
    `cancelled` and never stores a result. Keys without the `read` scope get `jobId` and
    `status` only."""
    return await _cancel(job_id, queue, store, principal)


@router.delete(
    "/jobs/{job_id}",
    response_model=JobView | CancelledJob,
    response_model_exclude_none=True,
    responses=_CANCEL,
)
async def delete(
    job_id: str, queue: QueueDep, store: StoreDep, principal: WriterDep
) -> JobView | CancelledJob:
    """The same as `POST /api/ai/jobs/{jobId}/cancel`."""
    return await _cancel(job_id, queue, store, principal)


async def _cancel(
    job_id: str, queue: JobQueue, store: JobStore, principal: Principal
) -> JobView | CancelledJob:
    reader = principal.allows(Scope.READ)
    history = await _history(store, job_id, principal)
    if history.status.finished:  # expired shows before a worker acts on it
        raise JobAlreadyFinished(_finished(history.status, reader))
    decision = await queue.request_cancel(job_id)
    if decision is CancelDecision.ALREADY_CANCELLED:
        raise JobAlreadyFinished("the job is already cancelled")
    if decision is CancelDecision.FINISHED:
        raise JobAlreadyFinished(_finished(None, reader))
    if not reader:
        return CancelledJob(job_id=job_id, status=JobStatus.CANCELLED)
    return JobHistory(await store.fetch(job_id)).view


def _finished(status: JobStatus | None, reader: bool) -> str:
    # A key that may not read a job's status does not learn it from a cancel either.
    if status is None or not reader:
        return "the job has already ended; nothing left to cancel"
    return f"the job is already {status.value}"


@router.get(
    "/jobs/{job_id}", response_model=JobRecord, response_model_exclude_none=True, responses=_READ
)
async def record(job_id: str, store: StoreDep, principal: ReaderDep) -> JobRecord:
    """The whole record: request, outcome, every attempt, log lines and timings."""
    return (await _history(store, job_id, principal, with_logs=True)).record()
