"""`GET /api/ai/jobs` (a tenant's jobs, newest first, paged) and `GET /api/ai/queue` (counts)."""

from __future__ import annotations

import re
from datetime import UTC, datetime
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request
from pydantic import BeforeValidator, WithJsonSchema

from flow_api.api.auth import ReaderDep
from flow_api.api.deps import StoreDep, _state
from flow_api.api.responses import errors
from flow_api.listing import JobFilter, JobIndex
from flow_api.models import JobList, JobStatus, QueueCounts

router = APIRouter(prefix="/api/ai", tags=["jobs"])

IndexDep = Annotated[JobIndex, Depends(_state("index"))]

_METADATA = "metadata."
_NUMBER = re.compile(r"[-+]?[\d.eE+-]+")


def _created_after(value: Any) -> Any:
    # Milliseconds since the epoch as digits, or an ISO 8601 date-time, as the schema says;
    # pydantic alone would also read "0.5" or "1e3" as a Unix time in seconds.
    if isinstance(value, str) and value.isdigit():
        return datetime.fromtimestamp(int(value) / 1000, UTC)
    if isinstance(value, str) and _NUMBER.fullmatch(value):
        raise ValueError("expected an ISO 8601 date-time or whole milliseconds since the epoch")
    return value


CreatedAfter = Annotated[
    datetime | None,
    BeforeValidator(_created_after),
    WithJsonSchema(
        {
            "anyOf": [
                {"type": "string", "format": "date-time"},
                {"type": "string", "pattern": "^[0-9]{1,15}$"},
            ]
        }
    ),
]


@router.get(
    "/jobs",
    response_model=JobList,
    response_model_exclude_none=True,
    responses=errors(401, 403, 422, 503),
)
async def list_jobs(
    request: Request,
    index: IndexDep,
    store: StoreDep,
    principal: ReaderDep,
    status: JobStatus | None = None,
    created_after: Annotated[
        CreatedAfter,
        Query(alias="createdAfter", description="ISO 8601, or milliseconds since the epoch"),
    ] = None,
    limit: Annotated[int, Query(ge=1, le=100)] = 20,
    cursor: Annotated[str | None, Query(max_length=200)] = None,
) -> JobList:
    """The caller's tenant's jobs, newest first. Filters: `status`, `createdAfter`, and any
    number of `metadata.<key>=<value>` (the job's `options.metadata[key]` equals the value).
    Follow `nextCursor` for older jobs; jobs submitted meanwhile never shift later pages. A
    page may hold fewer than `limit` jobs (a rare filter) and still have a `nextCursor`."""
    metadata = {
        name.removeprefix(_METADATA): value
        for name, value in request.query_params.items()
        if name.startswith(_METADATA) and len(name) > len(_METADATA)
    }
    after_ms = int(created_after.timestamp() * 1000) if created_after is not None else None
    wanted = JobFilter(status=status, created_after_ms=after_ms, metadata=metadata)
    page = await index.page(store, principal.tenant, wanted, limit, cursor)
    return JobList(jobs=page.jobs, next_cursor=page.next_cursor)


@router.get(
    "/queue",
    response_model=QueueCounts,
    responses=errors(401, 403, 503),
)
async def queue_counts(index: IndexDep, store: StoreDep, principal: ReaderDep) -> QueueCounts:
    """The caller's tenant's jobs counted by status (waiting, active, completed, failed,
    cancelled, expired), overall and per provider: the newest `FLOW_STREAM_COUNT_LIMIT`."""
    counts = await index.counts(store, principal.tenant)
    return QueueCounts(
        states={s.value: counts.states.get(s.value, 0) for s in JobStatus},
        providers={name: dict(by_state) for name, by_state in counts.providers.items()},
        counted=counts.counted,
        complete=counts.complete,
    )
