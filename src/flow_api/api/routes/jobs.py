"""Reading jobs back: status, result, and the whole record."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flow_api import history
from flow_api.api.auth import ReaderDep, WriterDep
from flow_api.api.deps import QueueDep
from flow_api.api.errors import error_response
from flow_api.api.responses import errors
from flow_api.auth.principal import ensure_owner
from flow_api.errors import JobAlreadyFinished
from flow_api.models import JobRecord, JobResult, JobStatus, JobView

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


@router.get("/status/{job_id}", response_model=JobView, responses=_READ)
async def status(job_id: str, queue: QueueDep, principal: ReaderDep) -> JSONResponse:
    """Where a job is: waiting, active, completed or failed, with attempts and timings."""
    job = ensure_owner(await queue.fetch(job_id), principal)
    return JSONResponse(history.view_of(job).wire())


@router.get("/result/{job_id}", response_model=JobResult, responses=_PENDING)
async def result(job_id: str, queue: QueueDep, principal: ReaderDep) -> JSONResponse:
    """200 with the generation once completed; 202 while pending; 409 when failed."""
    job = ensure_owner(await queue.fetch(job_id), principal)
    view = history.view_of(job)
    generation = history.generation_of(job)
    if view.status is JobStatus.COMPLETED and generation is not None:
        answer = JobResult(
            job_id=job_id, status=view.status, result=generation, metadata=view.metadata
        )
        return JSONResponse(answer.wire())
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


@router.post("/jobs/{job_id}/cancel", response_model=JobView, responses=_CANCEL)
async def cancel(job_id: str, queue: QueueDep, principal: WriterDep) -> JSONResponse:
    """Cancel a waiting or active job (on whichever worker holds it; its provider call is
    aborted). 409 `job_already_finished` when it already completed, failed, expired or was
    cancelled."""
    job = ensure_owner(await queue.fetch(job_id), principal)
    status = history.status_of(job)
    if status.finished:
        raise JobAlreadyFinished(f"the job is already {status.value}")
    if not await queue.request_cancel(job_id):
        raise JobAlreadyFinished("the job is already cancelled")
    return JSONResponse(history.view_of(await queue.fetch(job_id)).wire())


@router.delete("/jobs/{job_id}", response_model=JobView, responses=_CANCEL)
async def delete(job_id: str, queue: QueueDep, principal: WriterDep) -> JSONResponse:
    """The same as `POST /api/ai/jobs/{jobId}/cancel`."""
    return await cancel(job_id, queue, principal)


@router.get("/jobs/{job_id}", response_model=JobRecord, responses=_READ)
async def record(job_id: str, queue: QueueDep, principal: ReaderDep) -> JSONResponse:
    """The whole record: request, outcome, every attempt, log lines and timings."""
    job = ensure_owner(await queue.fetch(job_id, with_logs=True), principal)
    return JSONResponse(history.record_of(job).wire())
