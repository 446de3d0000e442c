"""`GET /api/ai/stream/{jobId}`: a job's events as server-sent events, resumable by id."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

import orjson
from fastapi import APIRouter, Depends, Header
from sse_starlette import EventSourceResponse, ServerSentEvent

from flow_api.api.auth import ReaderDep
from flow_api.api.deps import SettingsDep, _state
from flow_api.api.responses import errors
from flow_api.auth.principal import ensure_owner
from flow_api.errors import FlowError
from flow_api.models import ErrorBody, ErrorPayload
from flow_api.streaming.events import ERROR, StreamEvent, parse_event_id
from flow_api.streaming.reader import JobStreams

router = APIRouter(prefix="/api/ai", tags=["jobs"])

StreamsDep = Annotated[JobStreams, Depends(_state("streams"))]

_STREAM = {
    200: {
        "content": {"text/event-stream": {}},
        "description": "server-sent events: `status`, `token`, then one `result` or `error`; "
        "each with an `id` to resume from with `Last-Event-ID`",
    },
    **errors(
        400,
        401,
        403,
        404,
        503,
        s400="`Last-Event-ID` is not an id of this stream (`invalid_last_event_id`)",
    ),
}


@router.get("/stream/{job_id}", response_class=EventSourceResponse, responses=_STREAM)
async def stream(
    job_id: str,
    streams: StreamsDep,
    settings: SettingsDep,
    principal: ReaderDep,
    last_event_id: Annotated[str | None, Header(alias="Last-Event-ID")] = None,
) -> EventSourceResponse:
    """Watch a job: every event from the start (`status` changes, `token` text as the provider
    produces it, marked with its attempt), then its `result` (what `/result` answers) or
    `error` event, and the stream closes. With `Last-Event-ID`, exactly the events after that
    one, from any API process. A finished job's events are replayed, then the stream closes."""
    after = parse_event_id(last_event_id)
    history = await streams.history(job_id, principal.tenant)
    ensure_owner(history.job, principal)
    if not history.status.finished:
        await streams.watch(job_id)
    events = streams.events(job_id, principal.tenant, after)
    return EventSourceResponse(_frames(events), ping=settings.stream.ping_s)


async def _frames(events: AsyncIterator[StreamEvent]) -> AsyncIterator[ServerSentEvent]:
    """Events as SSE frames; an error once the stream has begun (Redis lost, the job removed)
    is sent as an `error` event without an id, so a client resumes from its last real one."""
    try:
        async for event in events:
            yield ServerSentEvent(_json(event.data), event=event.event, id=event.id)
    except FlowError as exc:
        body = ErrorBody(error=ErrorPayload(code=exc.code, message=exc.message))
        yield ServerSentEvent(_json(body.wire()), event=ERROR)


def _json(data: object) -> str:
    return orjson.dumps(data).decode()
