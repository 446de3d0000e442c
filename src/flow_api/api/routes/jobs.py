"""Reading jobs back: status, result, and the whole record; cancelling them."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flow_api.api.auth import ReaderDep, WriterDep
from flow_api.api.deps import QueueDep, StoreDep
from flow_api.api.errors import error_response
from flow_api.api.responses import errors
from flow_api.auth.principal import Principal, ensure_owner
from flow_api.errors import JobAlreadyFinished
from flow_api.history import JobHistory
from flow_api.models import JobRecord, JobResult, JobView
from flow_api.queue.producer import JobQueue
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
    response_model=JobView,
    response_model_exclude_none=True,
    responses=_CANCEL,
)
async def cancel(job_id: str, queue: QueueDep, store: StoreDep, principal: WriterDep) -> JobView:
    """Cancel a waiting or active job (on whichever worker holds it; its provider call is
    aborted). 409 `job_already_finished` when it already completed, failed, expired or was
    cancelled."""
    return await _cancel(job_id, queue, store, principal)


@router.delete(
    "/jobs/{job_id}", response_model=JobView, response_model_exclude_none=True, responses=_CANCEL
)
async def delete(job_id: str, queue: QueueDep, store: StoreDep, principal: WriterDep) -> JobView:
    """The same as `POST /api/ai/jobs/{jobId}/cancel`."""
    return await _cancel(job_id, queue, store, principal)


async def _cancel(job_id: str, queue: JobQueue, store: JobStore, principal: Principal) -> JobView:
    status = (await _history(store, job_id, principal)).status
    if status.finished:
        raise JobAlreadyFinished(f"the job is already {status.value}")
    if not await queue.request_cancel(job_id):
        raise JobAlreadyFinished("the job is already cancelled")
    return JobHistory(await store.fetch(job_id)).view


@router.get(
    "/jobs/{job_id}", response_model=JobRecord, response_model_exclude_none=True, responses=_READ
)
async def record(job_id: str, store: StoreDep, principal: ReaderDep) -> JobRecord:
    """The whole record: request, outcome, every attempt, log lines and timings."""
    return (await _history(store, job_id, principal, with_logs=True)).record()
