"""The API's side of job streams: a job's events from any position, then live, then its end.

Each watcher reads the job's stream on its own (`XREAD BLOCK` on a pooled connection): nothing
a watcher does reaches the worker, which only appends. A watcher that reads slowly is held back
by its own TCP connection; the stream stays in Redis, bounded, until the job's retention ends.
"""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis

from flow_api.history import JobHistory
from flow_api.keys import job_stream_key, job_watched_key
from flow_api.models import ErrorBody, ErrorPayload
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.queue.store import JobStore
from flow_api.settings import Settings
from flow_api.streaming.events import (
    DATA,
    END,
    ERROR,
    KIND,
    RESULT,
    START_ID,
    STATUS,
    StreamEvent,
    next_id,
)

_READ_COUNT = 500
_FINISH_POLL_S = 0.05
_FINISH_WAIT_S = 5.0
"""How long an `end` entry waits for the job's finish to land in BullMQ (written just after);
past it, the finish was lost (the job runs again) and the stream goes on."""


def ended_without_result(history: JobHistory) -> ErrorBody:
    """What `/result` answers (409) for a job that ended without a result."""
    view = history.view
    status = view.status.value
    reason = view.error.message if view.error else "no result"
    cause = view.error.wire() if view.error else None
    extra: dict[str, Any] = {"cause": cause, "jobId": view.job_id, "status": status}
    payload = ErrorPayload(code=f"job_{status}", message=f"the job is {status}: {reason}", **extra)
    return ErrorBody(error=payload)


def final_event(history: JobHistory, event_id: str) -> StreamEvent:
    """The `result` (what `/result` answers with 200) or `error` (its 409 body) event."""
    answer = history.result()
    if answer is not None:
        return StreamEvent(event_id, RESULT, answer.wire())
    return StreamEvent(event_id, ERROR, ended_without_result(history).wire())


class JobStreams:
    """Reads jobs' streams for the API (see `streaming/events.py` for what they hold)."""

    def __init__(self, store: JobStore, settings: Settings) -> None:
        self.store = store
        self.redis: Redis = store.redis
        self._prefix = settings.redis.prefix
        self._queue = settings.redis.queue_name
        # A blocked read must end before the client's socket timeout would cut it.
        most_ms = max(100, int(settings.redis.socket_timeout_s * 1000) - 500)
        self.block_ms = min(settings.stream.block_ms, most_ms)
        self.watch_s = min(settings.worker.retention_s, 86_400)
        # An `end` entry may trail the finish by a worker's flush: how long to look for it.
        self.settle_s = 2 * settings.stream.flush_ms / 1000 + 0.05

    async def history(self, job_id: str, tenant: str | None) -> JobHistory:
        return JobHistory(await self.store.fetch(job_id, tenant=tenant))

    async def watch(self, job_id: str) -> None:
        """Mark the job watched: its attempts that start from now stream the provider's tokens
        (`FLOW_STREAM_TOKENS=watched`)."""
        key = job_watched_key(self._prefix, self._queue, job_id)
        with redis_errors_as_unavailable():
            await self.redis.set(key, "1", ex=self.watch_s)

    async def events(
        self, job_id: str, tenant: str | None, after: str | None
    ) -> AsyncIterator[StreamEvent]:
        """The job's events after `after` (None: all, from the API's `waiting` event), live
        until its `result` or `error` event, which ends the iteration."""
        key = job_stream_key(self._prefix, self._queue, job_id)
        position = after or START_ID
        if after is None:
            yield StreamEvent(START_ID, STATUS, {"status": "waiting", "attempt": 0})
        block: int | None = None  # the first read takes what is there, without waiting
        unanswered_end: str | None = None  # an `end` read while the finish had not landed
        while True:
            entries = await self._read(key, position, block)
            block = self.block_ms
            if not entries:
                history = await self.history(job_id, tenant)
                if not history.status.finished:
                    continue
                # Ended as seen by the job's record: its `end` entry may still be on its way.
                await asyncio.sleep(self.settle_s)
                entries = await self._read(key, position, None)
                if not entries:
                    final_id = await self._final_id(key)
                    if final_id is None:  # the last entry is an `end`: it is the final event
                        final_id = unanswered_end if unanswered_end == position else None
                    elif _order(position) >= _order(final_id):
                        final_id = None  # the client had the final event already
                    if final_id is not None:
                        yield final_event(await self.history(job_id, tenant), final_id)
                    return
            for entry_id, fields in entries:
                position = entry_id
                kind, data = fields.get(KIND, ""), _data(fields)
                if kind != END:
                    yield StreamEvent(entry_id, kind, data)
                    continue
                final = await self._finished(job_id, tenant)
                if final is not None:
                    yield final_event(final, entry_id)
                    return
                unanswered_end = entry_id

    async def _read(
        self, key: str, position: str, block: int | None
    ) -> list[tuple[str, dict[str, str]]]:
        with redis_errors_as_unavailable():
            reply = await self.redis.xread({key: position}, count=_READ_COUNT, block=block)
        if not reply:
            return []
        # redis-py answers a list of [key, entries] (RESP2) or a dict key -> [entries] (RESP3).
        streams: Any = reply.values() if isinstance(reply, dict) else (e for _, e in reply)
        return [(str(i), dict(fields)) for entries in streams for i, fields in entries]

    async def _final_id(self, key: str) -> str | None:
        """The id the final event of a job that ended has: after the stream's last entry, or
        None when that entry is the `end` (whose id the final event took)."""
        with redis_errors_as_unavailable():
            last = await self.redis.xrevrange(key, count=1)
        if not last:
            return next_id(START_ID)
        entry_id, fields = last[0]
        return None if (fields or {}).get(KIND) == END else next_id(str(entry_id))

    async def _finished(self, job_id: str, tenant: str | None) -> JobHistory | None:
        """The job's record once its finish has landed (it follows the `end` entry at once);
        None if it does not within `_FINISH_WAIT_S` (that finish was lost: it runs again)."""
        loop = asyncio.get_running_loop()
        give_up = loop.time() + _FINISH_WAIT_S
        while True:
            history = await self.history(job_id, tenant)
            if history.status.finished:
                return history
            if loop.time() >= give_up:
                return None
            await asyncio.sleep(_FINISH_POLL_S)


def _order(entry_id: str) -> tuple[int, int]:
    ms, seq = entry_id.split("-")
    return int(ms), int(seq)


def _data(fields: dict[str, str]) -> dict[str, Any]:
    try:
        data = orjson.loads(fields.get(DATA, "{}"))
    except orjson.JSONDecodeError:
        return {}
    return data if isinstance(data, dict) else {}
