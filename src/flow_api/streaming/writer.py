"""The worker's side of job streams: one writer per process, batching every job's events.

Why one writer: a token is an event, and a round trip to Redis per token (or per job and token)
would cost more of the worker's CPU than the provider call. Events wait in memory, in order per
job; a single task writes everything pending in one pipelined round trip, at once when it was
idle, then at most every `FLOW_STREAM_FLUSH_MS`. A token's text joins the previous token event
of the same attempt when that one is not written yet, so a fast provider makes fewer, longer
events. Nothing here waits for a reader: readers `XREAD` the stream on their own connections.

Bounded: an attempt writes at most `FLOW_STREAM_MAX_EVENTS` token events; the rest of its text
is held and written as one event when the attempt ends. A Redis that cannot be written loses
the pending events of that round (logged): the job's outcome never depends on its stream.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import time
from collections.abc import AsyncIterator
from typing import Any

import orjson
from redis.asyncio import Redis

from flow_api.keys import job_stream_key, job_watched_key
from flow_api.queue.connection import REDIS_TROUBLE
from flow_api.settings import Settings
from flow_api.streaming.events import DATA, END, KIND, STATUS, TOKEN

log = logging.getLogger(__name__)

_WARN_EVERY_S = 30.0


class _Entry:
    """One event not yet written; a token event collects texts until it is."""

    __slots__ = ("data", "kind", "texts")

    def __init__(self, kind: str, data: dict[str, Any], texts: list[str] | None = None) -> None:
        self.kind = kind
        self.data = data
        self.texts = texts

    def fields(self) -> dict[str, str]:
        data = self.data if self.texts is None else {**self.data, "text": "".join(self.texts)}
        return {KIND: self.kind, DATA: orjson.dumps(data).decode()}


class StreamWriter:
    """Appends job events to their streams, batched (see the module docstring)."""

    def __init__(self, redis: Redis, settings: Settings) -> None:
        self.redis = redis
        self._prefix = settings.redis.prefix
        self._queue = settings.redis.queue_name
        # Kept as long as the job: the retention counts from the job's end, near the last write.
        self.ttl_s = settings.worker.retention_s
        self.flush_s = settings.stream.flush_ms / 1000
        self.max_events = settings.stream.max_events
        self._pending: dict[str, list[_Entry]] = {}
        self._wake = asyncio.Event()
        self._quiet_until = 0.0

    async def watched(self, job_id: str) -> bool:
        """Whether a client has opened the job's stream (`FLOW_STREAM_TOKENS=watched`); False
        when Redis cannot say (the text then comes as one event at the end)."""
        try:
            return bool(await self.redis.exists(job_watched_key(self._prefix, self._queue, job_id)))
        except REDIS_TROUBLE:
            return False

    def attempt(self, job_id: str, number: int) -> AttemptStream:
        """The stream of one attempt of `job_id`."""
        return AttemptStream(self, job_id, number)

    def add(self, job_id: str, kind: str, data: dict[str, Any]) -> None:
        self._pending.setdefault(job_id, []).append(_Entry(kind, data))
        self._wake.set()

    def add_token(self, job_id: str, attempt: int, text: str) -> bool:
        """Queue `text`; True when it started a new event (False: joined a pending one)."""
        entries = self._pending.setdefault(job_id, [])
        if entries:
            last = entries[-1]
            if last.texts is not None and last.data["attempt"] == attempt:
                last.texts.append(text)
                return False
        entries.append(_Entry(TOKEN, {"attempt": attempt}, [text]))
        self._wake.set()
        return True

    async def flush(self) -> None:
        """Write everything pending in one round trip."""
        if not self._pending:
            return
        pending, self._pending = self._pending, {}
        pipe = self.redis.pipeline(transaction=False)
        for job_id, entries in pending.items():
            key = job_stream_key(self._prefix, self._queue, job_id)
            for entry in entries:
                pipe.xadd(key, entry.fields())  # type: ignore[arg-type]
            pipe.expire(key, self.ttl_s)
        try:
            await pipe.execute()
        except REDIS_TROUBLE as exc:
            # At most one warning every few seconds: a Redis refusing writes for minutes must
            # not flood the log (a line per flush is 50 a second).
            now = time.monotonic()
            # INFO: the jobs' outcomes are unaffected (a stream is a view of the job).
            level = logging.INFO if now >= self._quiet_until else logging.DEBUG
            if level == logging.INFO:
                self._quiet_until = now + _WARN_EVERY_S
            log.log(
                level, "stream events of %d jobs not written: %s", len(pending), type(exc).__name__
            )

    async def run(self) -> None:
        """Write pending events until cancelled: at once after a quiet spell, then at most
        every `flush_s` (the batching that keeps streaming cheap)."""
        while True:
            await self._wake.wait()
            self._wake.clear()
            try:
                await self.flush()
            except Exception:  # never let the writer die: streams are a view, not the outcome
                log.exception("stream events not written")
            await asyncio.sleep(self.flush_s)

    @contextlib.asynccontextmanager
    async def running(self) -> AsyncIterator[StreamWriter]:
        """Run the writer for the duration; what is pending at exit is written last."""
        task = asyncio.create_task(self.run())
        try:
            yield self
        finally:
            task.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await task
            with contextlib.suppress(Exception):
                await asyncio.shield(self.flush())


class AttemptStream:
    """What one attempt writes: its start, its tokens (`token` is the provider's callback), a
    retry, or the job's end."""

    __slots__ = ("_held", "attempt", "events", "job_id", "writer")

    def __init__(self, writer: StreamWriter, job_id: str, attempt: int) -> None:
        self.writer = writer
        self.job_id = job_id
        self.attempt = attempt
        self.events = 0
        self._held: list[str] = []

    def started(self) -> None:
        self.writer.add(self.job_id, STATUS, {"status": "active", "attempt": self.attempt})

    def token(self, text: str) -> None:
        """A piece of the answer, as the provider produced it."""
        if not text:
            return
        if self.events >= self.writer.max_events:
            self._held.append(text)  # bounded stream: the rest comes as one event at the end
            return
        if self.writer.add_token(self.job_id, self.attempt, text):
            self.events += 1

    def retrying(self, error: dict[str, Any]) -> None:
        self._release()
        data = {"status": "retrying", "attempt": self.attempt, "error": error}
        self.writer.add(self.job_id, STATUS, data)

    def ended(self, status: str) -> None:
        """The job's outcome is decided (`completed`, `failed`, `cancelled`, `expired`)."""
        self._release()
        self.writer.add(self.job_id, END, {"status": status, "attempt": self.attempt})

    def _release(self) -> None:
        if self._held:
            held, self._held = self._held, []
            self.writer.add(self.job_id, TOKEN, {"attempt": self.attempt, "text": "".join(held)})
