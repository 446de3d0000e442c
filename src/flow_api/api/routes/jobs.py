"""Reading jobs back: status, result, and the whole record."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from fastapi.responses import JSONResponse

from flow_api import history
from flow_api.api.deps import QueueDep
from flow_api.api.errors import error_response
from flow_api.models import JobRecord, JobResult, JobStatus, JobView

router = APIRouter(prefix="/api/ai", tags=["jobs"])

_PENDING: dict[int | str, dict[str, Any]] = {
    202: {"model": JobView, "description": "not finished yet; poll again (see Retry-After)"},
    409: {"description": "the job failed: `error.code` is `job_failed`, `error.cause` says why"},
    404: {"description": "unknown or expired job id"},
}


@router.get("/status/{job_id}", response_model=JobView, responses={404: _PENDING[404]})
async def status(job_id: str, queue: QueueDep) -> JSONResponse:
    """Where a job is: waiting, active, completed or failed, with attempts and timings."""
    job = await queue.fetch(job_id)
    return JSONResponse(history.view_of(job).wire())


@router.get("/result/{job_id}", response_model=JobResult, responses=_PENDING)
async def result(job_id: str, queue: QueueDep) -> JSONResponse:
    """200 with the generation once completed; 202 while pending; 409 when failed."""
    job = await queue.fetch(job_id)
    view = history.view_of(job)
    generation = history.generation_of(job)
    if view.status is JobStatus.COMPLETED and generation is not None:
        answer = JobResult(
            job_id=job_id, status=view.status, result=generation, metadata=view.metadata
        )
        return JSONResponse(answer.wire())
    if view.status is JobStatus.FAILED:
        cause = view.error.wire() if view.error else None
        message = f"the job failed: {view.error.message}" if view.error else "the job failed"
        return error_response(
            409, "job_failed", message, {"cause": cause, "jobId": job_id, "status": "failed"}
        )
    return JSONResponse(view.wire(), status_code=202, headers={"Retry-After": "1"})


@router.get("/jobs/{job_id}", response_model=JobRecord, responses={404: _PENDING[404]})
async def record(job_id: str, queue: QueueDep) -> JSONResponse:
    """The whole record: request, outcome, every attempt, log lines and timings."""
    job = await queue.fetch(job_id, with_logs=True)
    return JSONResponse(history.record_of(job).wire())
