"""`/v1/batches`, as OpenAI's Batch API: create, read, list, cancel. The work itself is the
batch driver's (`batch/driver.py`); these handlers only record what was asked."""

from __future__ import annotations

import re
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BaseModel, ConfigDict, Field

from flow_api.api.auth import ReaderDep, SubmitterDep, WriterDep
from flow_api.api.deps import SettingsDep
from flow_api.api.responses import errors
from flow_api.api.routes.files import FilesDep
from flow_api.batch.driver import BatchDriver
from flow_api.batch.files import FilePurpose
from flow_api.batch.requests import ENDPOINT
from flow_api.batch.store import BatchStore
from flow_api.errors import BatchFileRejected, BatchNotCancellable

router = APIRouter(prefix="/v1", tags=["batches"])

_WINDOW = re.compile(r"([1-9][0-9]{0,2})h")
MAX_WINDOW_H = 168


class BatchCreate(BaseModel):
    """`POST /v1/batches` body (OpenAI's names)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    input_file_id: Annotated[str, Field(min_length=1, max_length=64)]
    endpoint: str
    completion_window: str = "24h"
    metadata: dict[str, Annotated[str, Field(max_length=512)]] | None = Field(
        default=None, max_length=16
    )


async def _batches(request: Request) -> BatchStore:  # async: no thread hop (deps.py)
    batches: BatchStore = request.app.state.batches
    return batches


async def _driver(request: Request) -> BatchDriver:
    driver: BatchDriver = request.app.state.batch_driver
    return driver


BatchesDep = Annotated[BatchStore, Depends(_batches)]
DriverDep = Annotated[BatchDriver, Depends(_driver)]


@router.post(
    "/batches",
    responses=errors(400, 401, 403, 404, 422, 429, 503),
    summary="Run every line of an uploaded file as a job",
)
async def create(
    body: BatchCreate,
    batches: BatchesDep,
    files: FilesDep,
    driver: DriverDep,
    settings: SettingsDep,
    principal: SubmitterDep,
) -> dict[str, Any]:
    """Answers at once with the batch `validating`; a bad line makes it `failed` with
    `errors.data[]` naming the lines, else it goes `in_progress` as its lines are queued."""
    if body.endpoint != ENDPOINT:
        raise BatchFileRejected(f"endpoint must be {ENDPOINT}", field="endpoint")
    window = _WINDOW.fullmatch(body.completion_window)
    if window is None or int(window.group(1)) > MAX_WINDOW_H:
        raise BatchFileRejected(
            f"completion_window must be hours, such as '24h' (at most {MAX_WINDOW_H}h)",
            field="completion_window",
        )
    stored = await files.get(body.input_file_id, principal.tenant)  # or 404
    if stored.purpose is not FilePurpose.BATCH:
        raise BatchFileRejected("the input file's purpose is not 'batch'", field="input_file_id")
    if stored.lines > settings.batch.max_lines:
        raise BatchFileRejected(f"the input file has more than {settings.batch.max_lines} lines")
    record = await batches.create(
        tenant=principal.tenant,
        input_file_id=stored.id,
        completion_window=body.completion_window,
        metadata=body.metadata,
        key_id=principal.key_id,
        tokens_per_day=principal.tokens_per_day,
        window_s=int(window.group(1)) * 3600,
    )
    driver.wake()
    return record.wire()


@router.get("/batches/{batch_id}", responses=errors(401, 403, 404, 503), summary="A batch")
async def read(batch_id: str, batches: BatchesDep, principal: ReaderDep) -> dict[str, Any]:
    return (await batches.get(batch_id, principal.tenant)).wire()


@router.get("/batches", responses=errors(401, 403, 503), summary="The tenant's batches")
async def listing(
    batches: BatchesDep,
    principal: ReaderDep,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
) -> dict[str, Any]:
    """Newest first; `after` is the last id of the previous page."""
    found, more = await batches.page(principal.tenant, after, limit)
    data = [record.wire() for record in found]
    return {
        "object": "list",
        "data": data,
        "first_id": data[0]["id"] if data else None,
        "last_id": data[-1]["id"] if data else None,
        "has_more": more,
    }


@router.post(
    "/batches/{batch_id}/cancel",
    responses=errors(401, 403, 404, 409, 503, s409="`batch_not_cancellable`: it already ended"),
    summary="Cancel a batch: lines not yet run never run; the batch ends `cancelled`",
)
async def cancel(
    batch_id: str, batches: BatchesDep, driver: DriverDep, principal: WriterDep
) -> dict[str, Any]:
    if not await batches.cancel(batch_id, principal.tenant):
        raise BatchNotCancellable(f"batch {batch_id} already ended")
    driver.wake()
    return (await batches.get(batch_id, principal.tenant)).wire()
