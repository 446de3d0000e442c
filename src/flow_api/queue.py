"""The only module that imports bullmq: enqueue, look up, consume; key names and job options.

BullMQ owns the job lifecycle (state, data, return value, attempts, logs). What Flow API adds on a
job is written as JSON lines in the job's own BullMQ log (see `history.py`), so it expires with
the job and needs no key of its own.
"""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import random
import re
import time
import uuid
from collections.abc import AsyncIterator, Awaitable, Callable
from dataclasses import dataclass
from typing import Any, NoReturn

import orjson
from bullmq import DelayedError, Job, Queue, UnrecoverableError
from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from flow_api.errors import FlowError, JobNotFound, QueueUnavailable
from flow_api.keys import CANCEL_FIELD, cancel_channel
from flow_api.settings import RedisSettings, WorkerSettings
from flow_api.slot_worker import SlotWorker, pending_logs

log = logging.getLogger(__name__)

JOB_NAME = "generate"
BACKOFF_TYPE = "flow-jitter"
# Slots per bullmq Worker. Shards were needed while bullmq's own loop ran the jobs (its
# asyncio.wait over every in-flight task made a job's cost grow with concurrency); the slot loop
# of `SlotWorker` costs the same per job at any concurrency, so one Worker serves a process.
SHARD_SLOTS = 10_000

_REDIS_DOWN = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    ConnectionError,
    OSError,
)


def connect(settings: RedisSettings) -> Redis:
    """A pooled Redis client with short timeouts, so a missing server answers fast."""
    return Redis.from_url(
        settings.url,
        decode_responses=True,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )


@contextlib.contextmanager
def redis_errors_as_unavailable() -> Any:
    """Turn a lost Redis connection into `QueueUnavailable` (HTTP 503), at the boundary."""
    try:
        yield
    except FlowError:
        raise
    except _REDIS_DOWN as exc:
        raise QueueUnavailable(f"the job store is unreachable: {type(exc).__name__}") from exc


@dataclass(frozen=True, slots=True)
class StoredJob:
    """A job as read back from Redis, in BullMQ's terms but our names."""

    id: str
    state: str
    data: dict[str, Any]
    created_ms: int
    started_ms: int | None
    finished_ms: int | None
    attempts_made: int
    failed_reason: str | None
    return_value: Any
    log_lines: list[str]
    cancel_requested_ms: int | None = None


class JobQueue:
    """Producer and reader side of the queue, used by the API."""

    def __init__(self, redis: Redis, redis_settings: RedisSettings, worker: WorkerSettings):
        self.redis = redis
        self.worker = worker
        self.queue = Queue(
            redis_settings.queue_name,
            {"connection": redis, "prefix": redis_settings.prefix},
        )
        self._flag_cancel = redis.register_script(_FLAG_CANCEL)

    def job_options(self, job_id: str, priority: int | None) -> dict[str, Any]:
        keep = {"age": self.worker.retention_s}
        opts: dict[str, Any] = {
            "jobId": job_id,
            "attempts": self.worker.attempts,
            "backoff": {"type": BACKOFF_TYPE, "delay": self.worker.backoff_base_ms},
            "removeOnComplete": keep,
            "removeOnFail": keep,
            # No Python tracebacks in Redis: they can quote an SDK's error text (a masked key,
            # a prompt); each attempt's typed error is in the job's log instead.
            "stackTraceLimit": 0,
        }
        if priority is not None:
            opts["priority"] = priority
        return opts

    async def enqueue(
        self, data: dict[str, Any], priority: int | None = None, job_id: str | None = None
    ) -> str:
        """Durably add a job; returns its id (by default a random, unguessable UUID)."""
        job_id = job_id or new_job_id()
        with redis_errors_as_unavailable():
            await self.queue.add(JOB_NAME, data, self.job_options(job_id, priority))
        return job_id

    async def fetch(self, job_id: str, *, with_logs: bool = False) -> StoredJob:
        """Read one job; raises `JobNotFound` for unknown (or expired) ids."""
        with redis_errors_as_unavailable():
            raw = await self.queue.backend.getJobData(job_id) if _valid_id(job_id) else None
            if not raw:
                raise JobNotFound(job_id)
            job = Job.fromJSON(self.queue, raw, job_id)
            state = await self.queue.getJobState(job_id)
            lines: list[str] = []
            if with_logs or state == "failed":  # a failure's reason is in its last attempt
                found = await self.queue.getJobLogs(job_id)
                lines = list(found.get("logs", []))
        return StoredJob(
            id=job_id,
            state=state,
            data=job.data if isinstance(job.data, dict) else {},
            created_ms=job.timestamp,
            started_ms=getattr(job, "processedOn", None),
            finished_ms=getattr(job, "finishedOn", None),
            attempts_made=job.attemptsMade,
            failed_reason=getattr(job, "failedReason", None),
            return_value=job.returnvalue,
            log_lines=lines,
            cancel_requested_ms=int(raw[CANCEL_FIELD]) if raw.get(CANCEL_FIELD) else None,
        )

    async def request_cancel(self, job_id: str) -> bool:
        """Flag a job cancelled and tell the worker holding it, if any. False if already flagged.

        A waiting job is failed as cancelled when a worker takes it (no provider call); a delayed
        one is promoted so that happens now; an active one is interrupted by its worker.
        """
        if not _valid_id(job_id):
            raise JobNotFound(job_id)
        with redis_errors_as_unavailable():
            flagged = await self._flag_cancel(
                keys=[self.queue.toKey(job_id)], args=[CANCEL_FIELD, int(time.time() * 1000)]
            )
            if flagged == 0:
                raise JobNotFound(job_id)
            if flagged == 2:
                return False
            await self.redis.publish(cancel_channel(self.queue.name), job_id)
            if await self.queue.getJobState(job_id) == "delayed":
                with contextlib.suppress(Exception):  # it may have moved on meanwhile
                    await self.queue.backend.promote(job_id)
        return True

    async def ping(self) -> None:
        with redis_errors_as_unavailable():
            await self.redis.ping()

    async def close(self) -> None:
        await self.queue.close()


# Set the cancel flag only on a job that exists (HSET would otherwise create a stray hash).
_FLAG_CANCEL = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
if redis.call("HSETNX", KEYS[1], ARGV[1], ARGV[2]) == 0 then return 2 end
return 1
"""


def new_job_id() -> str:
    return uuid.uuid4().hex


_JOB_ID = re.compile(r"[0-9a-f]{32}")


def _valid_id(job_id: str) -> bool:
    # BullMQ keys a queue's own structures beside its jobs (`meta`, `wait`, `events`...):
    # only ids this service mints may be looked up, so no request can address those.
    return _JOB_ID.fullmatch(job_id) is not None


# --- consumer side ----------------------------------------------------------------------------


class JobHandle:
    """What a handler sees of an active job: its data, attempt number and log."""

    def __init__(self, job: Job, token: str) -> None:
        self._job = job
        self._token = token

    @property
    def id(self) -> str:
        return str(self._job.id)

    @property
    def data(self) -> dict[str, Any]:
        data = self._job.data
        return data if isinstance(data, dict) else {}

    @property
    def attempt(self) -> int:
        """1 for the first try."""
        return int(self._job.attemptsMade) + 1

    @property
    def max_attempts(self) -> int:
        return int(self._job.opts.get("attempts") or 1)

    async def log(self, entry: dict[str, Any]) -> None:
        await self._job.log(orjson.dumps(entry).decode())

    def log_at_finish(self, entry: dict[str, Any]) -> None:
        """Log `entry` in the same round trip that completes the job (or before it fails)."""
        pending_logs(self._job).append(orjson.dumps(entry).decode())

    async def begin(self, entry: dict[str, Any]) -> bool:
        """Log the attempt's start and read the cancel flag in one round trip; True if
        cancellation was requested before this worker could hear about it."""
        worker = self._job.queue  # the SlotWorker that took the job
        logs, job_key = worker.backend.toKey(f"{self.id}:logs"), worker.backend.toKey(self.id)
        line = orjson.dumps(entry).decode()

        def build(pipe: Any) -> None:
            pipe.rpush(logs, line)
            pipe.hget(job_key, CANCEL_FIELD)

        replies = await worker.pipelined(build, 2)
        for reply in replies:
            if isinstance(reply, Exception):
                raise reply
        return replies[1] is not None

    async def hand_back(self) -> None:
        """Return the job to the queue without spending an attempt (used on shutdown)."""
        await self._job.moveToDelayed(int(time.time() * 1000), self._token)

    @property
    def starts(self) -> int:
        """How many times a worker has taken this job, this time included (BullMQ's `ats`)."""
        return max(int(self._job.attemptsStarted or 0), self.attempt)

    async def cancel_requested(self) -> bool:
        """True if a client has asked to cancel the job (one read)."""
        worker = self._job.queue
        return await worker.client.hget(worker.backend.toKey(self.id), CANCEL_FIELD) is not None

    async def defer(self, until_ms: int) -> NoReturn:
        """Put the job back to wait until `until_ms` without spending an attempt, freeing its
        slot; raises `JobDeferred`, which the consumer turns into bullmq's `DelayedError`."""
        await self._job.moveToDelayed(until_ms, self._token)
        raise JobDeferred(until_ms)


class JobDeferred(BaseException):
    """The job went back to the queue to wait (for rate budget); not an outcome of the job.

    A `BaseException` so that handler code's `except Exception` (metering, logging) lets it
    pass untouched, as it does `asyncio.CancelledError`.
    """

    def __init__(self, until_ms: int) -> None:
        super().__init__(until_ms)
        self.until_ms = until_ms


Handler = Callable[[JobHandle], Awaitable[dict[str, Any]]]

CANCEL_REQUESTED = "flow: cancel requested"


def is_cancel_request(exc: asyncio.CancelledError) -> bool:
    """True when the cancellation came from a client's cancel, not from a shutdown."""
    return bool(exc.args) and exc.args[0] == CANCEL_REQUESTED


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
    """Runs `handler` on jobs with `concurrency` slots, over bullmq Workers of ≤100 slots each.

    Non-retryable `FlowError`s fail the job at once; others are retried by BullMQ with
    `retry_delay_ms`. On stop, in-flight jobs get `shutdown_grace_s` to finish; the rest are
    handed back to the queue.
    """

    def __init__(self, redis: RedisSettings, worker: WorkerSettings, handler: Handler) -> None:
        self.redis = redis
        self.settings = worker
        self.handler = handler
        self._workers: list[SlotWorker] = []
        self._stopping = False
        self._closed = asyncio.Event()
        self._stop_started = False
        self._stopped = asyncio.Event()
        self._running: dict[str, asyncio.Task[Any]] = {}

    async def _process(self, job: Job, token: str) -> dict[str, Any]:
        handle = JobHandle(job, token)
        task = asyncio.current_task()
        if task is not None:
            self._running[handle.id] = task
        try:
            return await self.handler(handle)
        except JobDeferred:
            raise DelayedError("waiting for rate budget") from None
        except asyncio.CancelledError:
            if self._stopping:
                await asyncio.shield(handle.hand_back())
                raise DelayedError("handed back on shutdown") from None
            raise
        except FlowError as exc:
            if not exc.retryable:
                raise UnrecoverableError(str(exc)) from exc
            raise
        finally:
            self._running.pop(handle.id, None)

    def cancel(self, job_id: str) -> bool:
        """Interrupt the job if this process holds it; the handler sees `is_cancel_request`."""
        task = self._running.get(job_id)
        if task is None or task.done():
            return False
        task.cancel(CANCEL_REQUESTED)
        return True

    async def _listen_for_cancels(self) -> None:
        """Follow the cancel channel until closed, reconnecting after Redis outages."""
        channel = cancel_channel(self.redis.queue_name)
        while not self._closed.is_set():
            client = connect(self.redis)
            try:
                async with client.pubsub(ignore_subscribe_messages=True) as pubsub:
                    await pubsub.subscribe(channel)
                    while not self._closed.is_set():
                        message = await pubsub.get_message(timeout=0.5)
                        if message is not None:
                            self.cancel(str(message["data"]))
            except _REDIS_DOWN as exc:
                log.warning("cancel channel lost (%s); reconnecting", type(exc).__name__)
                await asyncio.sleep(0.5)
            finally:
                await client.aclose()

    def _worker_options(self, slots: int) -> dict[str, Any]:
        s = self.settings
        return {
            "autorun": False,
            "concurrency": slots,
            "connection": self.redis.url,
            "prefix": self.redis.prefix,
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
        """Consume until `stop()`; returns when every shard has closed."""
        total = self.settings.concurrency
        shards = max(1, math.ceil(total / SHARD_SLOTS))
        for index in range(shards):
            slots = total // shards + (1 if index < total % shards else 0)
            worker = SlotWorker(self.redis.queue_name, self._process, self._worker_options(slots))
            worker.on("error", _log_worker_error)
            self._workers.append(worker)
        listener = asyncio.create_task(self._listen_for_cancels())
        try:
            await asyncio.gather(*(w.run() for w in self._workers))
            if self._stop_started:
                # bullmq's run loop returns as soon as it stops taking jobs; callers must not
                # release providers while in-flight jobs are still finishing.
                await self._stopped.wait()
        finally:
            self._closed.set()
            listener.cancel()  # don't wait out its poll timeout: idle shutdown stays fast
            with contextlib.suppress(asyncio.CancelledError):
                await listener

    @property
    def in_flight(self) -> int:
        return sum(len(w.jobs) for w in self._workers)

    async def stop(self) -> None:
        """Stop taking jobs; in-flight ones get the grace period, then go back to the queue."""
        self._stop_started = True
        workers = list(self._workers)
        graceful = asyncio.gather(*(w.close() for w in workers))
        try:
            await asyncio.wait_for(asyncio.shield(graceful), self.settings.shutdown_grace_s)
        except TimeoutError:
            log.warning("grace period over; handing %d jobs back to the queue", self.in_flight)
            self._stopping = True
            for worker in workers:
                worker.cancelProcessing()
            with contextlib.suppress(Exception):
                await graceful
        finally:
            self._stopped.set()

    def hurry(self) -> None:
        """End the grace period now: in-flight jobs go back to the queue, `stop()` returns."""
        self._stopping = True
        for worker in self._workers:
            worker.cancelProcessing()


def _log_worker_error(err: BaseException, *_: Any) -> None:
    log.warning("queue worker error: %s: %s", type(err).__name__, err)


@contextlib.asynccontextmanager
async def job_queue(redis: RedisSettings, worker: WorkerSettings) -> AsyncIterator[JobQueue]:
    """A `JobQueue` with its own Redis pool, closed on exit."""
    client = connect(redis)
    queue = JobQueue(client, redis, worker)
    try:
        yield queue
    finally:
        await queue.close()
        await client.aclose()
