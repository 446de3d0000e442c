"""The worker's side of the queue: take jobs, hand each to a handler, finish it as it says.

Imported by worker processes only. The handler contract, in full:

- return a dict: the job completed with that value;
- raise `AttemptFailed(error, final=...)`: the handler already decided whether another attempt
  follows (`final=False`: BullMQ retries after `retry_delay_ms`; `final=True`: the job fails);
- raise `JobDeferred` (through `JobHandle.defer`): the job went back to wait, no attempt spent;
- let `CancelledError` out only on shutdown: the job is handed back to the queue;
- fail a job `JobHandle.stalled_too_often` says BullMQ gave up on (final, no provider call).

A client's cancel reaches the task running the job as `CancelledError` once, with
`JobHandle.cancelled_by_client` set; the handler turns it into an outcome. Before a job ends,
the handler asks `JobHandle.may_finish` whether a cancel came first (one atomic decision).
"""

from __future__ import annotations

import asyncio
import contextlib
import hashlib
import logging
import math
import random
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from bullmq import DelayedError, Job, UnrecoverableError
from redis.asyncio import Redis
from redis.exceptions import NoScriptError

from flow_api.errors import FlowError
from flow_api.jobs import JobData, now_ms
from flow_api.keys import CANCEL_FIELD, FINISHING_FIELD, STARTED_FIELD, cancel_channel
from flow_api.queue.connection import REDIS_DOWN
from flow_api.queue.slot_worker import TRIMMED_DATA, SlotWorker, pending_logs
from flow_api.settings import RedisSettings, WorkerSettings

log = logging.getLogger(__name__)

CANCEL_REQUESTED = "flow: cancel requested"

# The worker's half of the one decision between a cancel and the job's end (the API's half is
# `producer._FLAG_CANCEL`): unless the job is flagged cancelled, mark it finishing, after which
# a cancel answers `job_already_finished`. Both run as scripts on the job's hash, so Redis
# orders them: whichever runs first wins. KEYS: job hash. ARGV: cancel field, finishing field,
# the attempt's token. 0: the cancel won; 1: this attempt may finish the job. `allow-oom`: one
# small field must not stop a job from finishing when Redis is at its memory limit (the finish
# itself goes through there: its first write frees the job's lock), or a full Redis never drains.
_DECIDE = """#!lua flags=allow-oom
if redis.call("HEXISTS", KEYS[1], ARGV[1]) == 1 then return 0 end
if redis.call("EXISTS", KEYS[1]) == 1 then redis.call("HSET", KEYS[1], ARGV[2], ARGV[3]) end
return 1
"""


class JobDeferred(BaseException):
    """The job went back to the queue to wait (for rate budget); not an outcome of the job.

    A `BaseException` so that handler code's `except Exception` lets it pass untouched, as it
    does `asyncio.CancelledError`.
    """

    def __init__(self, until_ms: int) -> None:
        super().__init__(until_ms)
        self.until_ms = until_ms


class AttemptFailed(Exception):
    """An attempt ended in `error`; `final` is the handler's one retry decision."""

    def __init__(self, error: BaseException, *, final: bool) -> None:
        super().__init__(str(error))
        self.error = error
        self.final = final


_DECIDE_SHA = hashlib.sha1(_DECIDE.encode()).hexdigest()


@dataclass(frozen=True, slots=True)
class Begun:
    """What `JobHandle.begin` learned as the attempt started."""

    cancelled: bool
    """A client asked to cancel the job before this worker could hear about it."""
    started_before: bool
    """An earlier attempt of the job started (so its start deadline no longer applies)."""


class JobHandle:
    """What a handler sees of an active job: its data, attempt number and log."""

    def __init__(self, job: Job, token: str) -> None:
        self._job = job
        self._token = token
        self._data: JobData | None = None
        self.cancellable = True
        """Whether a client's cancel may still interrupt the attempt (the handler clears it
        once the outcome is decided)."""
        self.cancelled_by_client = False
        """Set just before a client's cancel interrupts the task running this job."""

    @property
    def id(self) -> str:
        return str(self._job.id)

    @property
    def data(self) -> JobData:
        """The job's envelope; raises `InvalidRequest` when the stored data is not ours."""
        if self._data is None:
            self._data = JobData.parse(self._job.data)
        return self._data

    @property
    def attempt(self) -> int:
        """1 for the first try."""
        return int(self._job.attemptsMade) + 1

    @property
    def max_attempts(self) -> int:
        return int(self._job.opts.get("attempts") or 1)

    @property
    def stalled_too_often(self) -> bool:
        """BullMQ's stalled check found this job's lock lost more than `maxStalledCount`
        times and marked it to fail (`deferredFailure`); the handler fails it, so that its
        outcome is recorded and its quota settled like any other failure."""
        return bool(self._job.deferredFailure)

    @property
    def starts(self) -> int:
        """How many times a worker has taken this job, this time included (BullMQ's `ats`)."""
        return max(int(self._job.attemptsStarted or 0), self.attempt)

    async def log(self, entry: dict[str, Any]) -> None:
        await self._job.log(orjson.dumps(entry).decode())

    def log_at_finish(self, entry: dict[str, Any]) -> None:
        """Log `entry` in the same round trip that completes the job (or before it fails)."""
        pending_logs(self._job).append(orjson.dumps(entry).decode())

    async def begin(self, entry: dict[str, Any]) -> Begun:
        """Log the attempt's start, mark the job started and read its cancel flag, in one round
        trip. A finishing mark left by an attempt whose finish was lost (a crash, a lost Redis)
        is cleared: this attempt decides again."""
        worker = self._job.queue  # the SlotWorker that took the job
        logs, job_key = worker.backend.toKey(f"{self.id}:logs"), worker.backend.toKey(self.id)
        line = orjson.dumps(entry).decode()

        def build(pipe: Any) -> None:
            pipe.rpush(logs, line)
            pipe.hget(job_key, CANCEL_FIELD)
            pipe.hsetnx(job_key, STARTED_FIELD, entry.get("at") or now_ms())
            pipe.hdel(job_key, FINISHING_FIELD)

        replies = await worker.pipelined(build, 4)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return Begun(cancelled=replies[1] is not None, started_before=not replies[2])

    async def may_finish(self) -> bool:
        """The one decision between a client's cancel and this attempt's outcome (a result, or
        a final failure), made atomically in Redis: False if the cancel came first (the job
        must end as cancelled); True if this attempt now finishes the job (a later cancel
        answers `job_already_finished`)."""
        worker = self._job.queue
        job_key = worker.backend.toKey(self.id)
        args = (CANCEL_FIELD, FINISHING_FIELD, self._token)

        def build(pipe: Any) -> None:
            pipe.evalsha(_DECIDE_SHA, 1, job_key, *args)

        async def decide() -> bool:
            reply = (await worker.pipelined(build, 1))[0]
            if isinstance(reply, NoScriptError):  # a restarted Redis forgot it
                reply = await worker.client.eval(_DECIDE, 1, job_key, *args)
            elif isinstance(reply, Exception):
                raise reply
            return bool(reply)

        # Waited out like the finish that follows: the provider has answered (or the attempt
        # failed for good), and a Redis refusing writes must not cost a second paid call.
        decision: bool = await worker.persist("finish", decide)
        return decision

    async def cancel_requested(self) -> bool:
        """True if a client has asked to cancel the job (one read)."""
        worker = self._job.queue
        return await worker.client.hget(worker.backend.toKey(self.id), CANCEL_FIELD) is not None

    async def hand_back(self) -> None:
        """Return the job to the queue without spending an attempt (used on shutdown)."""
        await self._job.moveToDelayed(now_ms(), self._token)

    async def defer(self, until_ms: int) -> NoReturn:
        """Put the job back to wait until `until_ms` without spending an attempt, freeing its
        slot; raises `JobDeferred`, which the consumer turns into bullmq's `DelayedError`."""
        await self._job.moveToDelayed(until_ms, self._token)
        raise JobDeferred(until_ms)


Handler = Callable[[JobHandle], Awaitable[dict[str, Any]]]


def retry_delay_ms(settings: WorkerSettings, attempts_made: int, err: BaseException) -> int:
    """Exponential backoff with equal jitter, never shorter than a provider's Retry-After."""
    ceiling = min(
        settings.backoff_max_ms, settings.backoff_base_ms << min(max(attempts_made - 1, 0), 30)
    )
    delay = ceiling / 2 + random.uniform(0, ceiling / 2)
    retry_after = getattr(err, "retry_after", None)
    if isinstance(retry_after, int | float) and retry_after > 0:
        delay = max(delay, float(retry_after) * 1000)
    return max(1, math.ceil(delay))


class QueueConsumer:
    """Runs `handler` on jobs with `concurrency` slots of one `SlotWorker`.

    On stop, in-flight jobs get `shutdown_grace_s` to finish; the rest are handed back to the
    queue. `redis` (the worker process's pool) carries the cancel channel.
    """

    def __init__(
        self, redis: Redis, settings: RedisSettings, worker: WorkerSettings, handler: Handler
    ) -> None:
        self.redis = redis
        self.redis_settings = settings
        self.settings = worker
        self.handler = handler
        self.slots: SlotWorker | None = None
        self._stopping = False
        self._stop_started = False
        self._stopped = asyncio.Event()
        self._running: dict[str, tuple[JobHandle, asyncio.Task[Any]]] = {}

    async def _process(self, job: Job, token: str) -> dict[str, Any]:
        handle = JobHandle(job, token)
        task = asyncio.current_task()
        if task is not None:
            self._running[handle.id] = (handle, task)
        try:
            result = await self.handler(handle)
            self._trim_once_completed(job)
            return result
        except JobDeferred:
            raise DelayedError("waiting for rate budget") from None
        except AttemptFailed as failed:
            if failed.final:
                raise UnrecoverableError(str(failed.error)) from failed.error
            raise failed.error from None  # BullMQ retries it, after `retry_delay_ms`
        except asyncio.CancelledError:
            if self._stopping:
                await asyncio.shield(handle.hand_back())
                raise DelayedError("handed back on shutdown") from None
            raise
        finally:
            self._running.pop(handle.id, None)

    def _trim_once_completed(self, job: Job) -> None:
        """Have the finish cut a long prompt from the job's stored data (`JobData.trimmed`)."""
        keep = self.settings.keep_prompt_chars
        if not keep:
            return
        try:
            data = JobData.parse(job.data)
        except FlowError:  # not our envelope: leave it as it is
            return
        trimmed = data.trimmed(keep)
        if trimmed is not data:
            setattr(job, TRIMMED_DATA, orjson.dumps(trimmed.wire()).decode())

    def cancel(self, job_id: str) -> bool:
        """Interrupt the job if this process holds it, once: later cancels of the same attempt
        find nothing, so a handler turning the first into an outcome is not interrupted."""
        running = self._running.pop(job_id, None)
        if running is None or running[1].done() or not running[0].cancellable:
            return False
        handle, task = running
        handle.cancelled_by_client = True
        task.cancel(CANCEL_REQUESTED)
        return True

    async def _listen_for_cancels(self) -> None:
        """Follow the cancel channel until cancelled, reconnecting after Redis outages."""
        channel = cancel_channel(self.redis_settings.queue_name)
        while True:
            try:
                async with self.redis.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    while True:
                        message = await pubsub.get_message(timeout=0.5)
                        if message is not None:
                            self.cancel(str(message["data"]))
            except REDIS_DOWN as exc:
                log.warning("cancel channel lost (%s); reconnecting", type(exc).__name__)
                await asyncio.sleep(0.5)

    def _worker_options(self) -> dict[str, Any]:
        s = self.settings
        return {
            "autorun": False,
            "concurrency": s.concurrency,
            "connection": self.redis_settings.url,
            "prefix": self.redis_settings.prefix,
            "lockDuration": s.lock_duration_ms,
            "stalledInterval": s.stalled_interval_ms,
            "maxStalledCount": s.max_stalled,
            # bullmq's Worker.close() waits up to drainDelay seconds while idle; keep it short.
            "drainDelay": 1,
            "runRetryDelay": 1000,
            "settings": {
                "backoffStrategy": lambda attempts, _type, err, _job: retry_delay_ms(
                    s, attempts, err
                )
            },
        }

    async def run(self) -> None:
        """Consume until `stop()`; returns once in-flight jobs are finished or handed back.
        Raises `SlotsLost` when the slots cannot be kept running."""
        if self._stop_started:  # stopped before it started (a signal during start-up)
            return
        self.slots = SlotWorker(
            self.redis_settings.queue_name, self._process, self._worker_options()
        )
        self.slots.on("error", _log_worker_error)
        listener = asyncio.create_task(self._listen_for_cancels())
        try:
            await self.slots.run()
            if self._stop_started:
                # The slot loop returns as soon as it stops taking jobs; callers must not
                # release providers while in-flight jobs are still finishing.
                await self._stopped.wait()
        finally:
            listener.cancel()  # don't wait out its poll timeout: idle shutdown stays fast
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    @property
    def live_slots(self) -> int:
        """Slots running now (the configured concurrency, unless some are being replaced)."""
        return self.slots.live_slots if self.slots is not None else 0

    @property
    def in_flight(self) -> int:
        return len(self.slots.jobs) if self.slots is not None else 0

    async def stop(self) -> None:
        """Stop taking jobs; in-flight ones get the grace period, then go back to the queue."""
        self._stop_started = True
        slots = self.slots
        try:
            if slots is None:
                return
            graceful = asyncio.ensure_future(slots.close())
            try:
                await asyncio.wait_for(asyncio.shield(graceful), self.settings.shutdown_grace_s)
            except TimeoutError:
                log.warning("grace period over; handing %d jobs back to the queue", self.in_flight)
                self._stopping = True
                slots.cancelProcessing()
                with contextlib.suppress(Exception):
                    await graceful
        finally:
            self._stopped.set()

    def hurry(self) -> None:
        """End the grace period now: in-flight jobs go back to the queue, `stop()` returns."""
        self._stopping = True
        if self.slots is not None:
            self.slots.cancelProcessing()


def _log_worker_error(err: BaseException, *_: Any) -> None:
    log.warning("queue worker error: %s: %s", type(err).__name__, err)
