"""bullmq's `Worker` with its run loop replaced: one long-lived task per slot, one round trip a job.

Part of the queue layer (`queue/consumer.py` builds it; nothing else touches it).

Why. bullmq's `Worker.run` makes a task per job and a task per fetch, and calls `asyncio.wait`
over every in-flight task each time one finishes, so its cost per job grows with concurrency;
and it fetches the next job with its own `moveToActive` call after each `moveToFinished`. On
this 2-core machine each Redis round trip cost about 0.2 ms of worker CPU (mostly the socket
write), as much as the whole queue layer may spend on a job. Here:

- each slot is one task that loops: take a job, run the processor, finish it;
- finishing uses `moveToFinished` with `fetchNext` — as Node's BullMQ worker does — so the same
  script call that completes a job hands the slot its next one: one round trip a job, not two;
- log lines a handler leaves for the finish (`JobHandle.log_at_finish`) travel in the same
  pipeline as that script call;
- when the queue is drained, one slot blocks on BullMQ's marker (`BZPOPMIN`, bullmq's own
  `getNextJob`) and the others park; a slot that gets a job wakes one more, so a burst of jobs
  fans out to idle slots one round trip at a time without a thundering herd.

What is unchanged, because it is bullmq's code: the Lua scripts (`moveToActive`,
`moveToFinished` — each with the fair-share release of `fair_share` run before its take —,
`moveToDelayed`, `retryJob`: Node BullMQ clients, bull-board and Taskforce see
the same states and events), lock renewal (`LockManager`), the stalled-job check, retries and
backoff (`Job.moveToFailed`), `DelayedError`, `close()` waiting for in-flight jobs and
`cancelProcessing()` for forced shutdown. Not supported here: `pause()`/`resume()` of a single
worker (the service never uses them; pausing the queue itself works).

Slots are supervised: a slot task that ends while the worker is not closing (whatever ended
it, `CancelledError` included) is logged at ERROR and replaced at once, so the worker never
silently serves with fewer slots than configured. When slots keep dying faster than
`MAX_REPLACEMENTS` a minute, the worker cannot serve: `run()` raises `SlotsLost`.
"""

from __future__ import annotations

import asyncio
import collections
import itertools
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any, TypeVar

from bullmq import DelayedError, Job, Worker
from bullmq.custom_errors import WaitingChildrenError
from bullmq.scripts import raw2NextJobData
from bullmq.timer import Timer
from redis.exceptions import NoScriptError

from flow_api.queue.backoff import RedisBackoff
from flow_api.queue.connection import REDIS_TROUBLE
from flow_api.queue.fair_share import with_release

log = logging.getLogger(__name__)
T = TypeVar("T")

MAX_BLOCK_S = 4.0
MAX_REPLACEMENTS = 100
"""Slot replacements tolerated in a minute before the worker gives up (`SlotsLost`)."""
PENDING_LOGS = "flow_pending_logs"
"""Attribute of a bullmq `Job` holding log lines to write with its completion."""
TRIMMED_DATA = "flow_trimmed_data"
"""Attribute of a bullmq `Job` holding the smaller data to keep once it completed."""

# Replace a job's data with its trimmed form, only if the job did complete (it is in the
# completed set): run after `moveToFinished` in the same pipeline, so a finish that failed
# (lock lost, retried later) leaves the job's data whole. KEYS: job hash, completed set.
# ARGV: job id, trimmed data.
_TRIM_COMPLETED = """
if redis.call("ZSCORE", KEYS[2], ARGV[1]) then
  redis.call("HSET", KEYS[1], "data", ARGV[2])
  return 1
end
return 0
"""


def pending_logs(job: Job) -> list[str]:
    """The job's list of log lines waiting for its finish (created on first use)."""
    lines: list[str] | None = getattr(job, PENDING_LOGS, None)
    if lines is None:
        lines = []
        setattr(job, PENDING_LOGS, lines)
    return lines


class SlotsLost(RuntimeError):
    """Slots kept ending faster than they could be replaced: this worker cannot serve."""


class SlotWorker(Worker):  # type: ignore[misc]  # bullmq ships no type information
    """A bullmq `Worker` whose `concurrency` slots each run one job after another."""

    running: bool
    closing: bool
    processing: set[asyncio.Task[None]]

    def __init__(self, name: str, processor: Any, opts: dict[str, Any]) -> None:
        super().__init__(name, processor, {**opts, "autorun": False})
        self._parked: collections.deque[asyncio.Future[None]] = collections.deque()
        self._tokens = itertools.count(1)
        self._batch = TurnPipeline(self.client)
        self._ended: asyncio.Queue[asyncio.Task[None]] = asyncio.Queue()
        self._replaced: collections.deque[float] = collections.deque()
        self.backoff = RedisBackoff()
        """Shared by the slots while Redis refuses takes and finishes (out of memory, down)."""
        self._trim = self.client.register_script(_TRIM_COMPLETED)
        # Every take releases the next fair-share job first (see `fair_share`): swap bullmq's
        # two take scripts for the same text with that release before their pop of `wait`.
        commands = self.scripts.commands
        for name in ("moveToActive", "moveToFinished"):
            text = with_release(name, commands[name].script)
            commands[name] = self.client.register_script(text)

    @property
    def maximumBlockTimeout(self) -> float:
        # A blocking wait must end before the client's socket timeout (redis-py 8 defaults to
        # 5 s): past it the client gives up, and bullmq's connection retries with a backoff of
        # up to 20 s, so delayed jobs due in 5-10 s (bullmq's own cap) started minutes late.
        return MAX_BLOCK_S

    # --- the loop -------------------------------------------------------------------------

    async def run(self) -> None:
        if self.running:
            raise RuntimeError("Worker is already running")
        await self._ensure_client_names()
        # bullmq learns what the server can do only from getRedisVersion(), which its Worker
        # never calls; without it every blocking wait is rounded up to whole seconds, and
        # delayed jobs (retries, jobs waiting for rate budget) started up to a second late.
        for connection in (self.redisConnection, self.blockingRedisConnection):
            if connection is not None:
                await connection.getRedisVersion()
        self.lockManager.start()
        self.stalledCheckTimer = Timer(
            self.opts["stalledInterval"] / 1000, self.runStalledJobsCheck, self.emit
        )
        self.running = True
        # Pipelined calls use EVALSHA without redis-py's per-pipeline SCRIPT EXISTS check (an
        # extra round trip each time): load the script once here; NOSCRIPT falls back above.
        await self.client.script_load(self.scripts.commands["moveToFinished"].script)
        await self.client.script_load(_TRIM_COMPLETED)
        # bullmq's close() waits for, and cancelProcessing() cancels, the tasks in `processing`:
        # the set of live slots, kept current as slots are replaced.
        self.processing = set()
        for _ in range(self.opts["concurrency"]):
            self._start_slot()
        try:
            await self._supervise()
        finally:
            self.running = False
            for task in self.processing:
                task.cancel()
            self.stalledCheckTimer.stop()
            await self.lockManager.close()

    @property
    def live_slots(self) -> int:
        """Slot tasks running now."""
        return sum(1 for task in self.processing if not task.done())

    def _start_slot(self) -> None:
        task = asyncio.ensure_future(self._slot())
        self.processing.add(task)
        task.add_done_callback(self._ended.put_nowait)

    async def _supervise(self) -> None:
        """Wait for slots to end; replace any that ends while the worker is not closing."""
        while self.processing:
            task = await self._ended.get()
            self.processing.discard(task)
            if self.closing:
                continue
            log.error("a worker slot ended unexpectedly (%s); starting a replacement", _why(task))
            now = time.monotonic()
            self._replaced.append(now)
            while self._replaced and self._replaced[0] < now - 60:
                self._replaced.popleft()
            if len(self._replaced) > MAX_REPLACEMENTS:
                raise SlotsLost(
                    f"{len(self._replaced)} worker slots ended within a minute; last: {_why(task)}"
                )
            self._start_slot()

    async def _slot(self) -> None:
        job: Job | None = None
        while True:
            if job is None:
                if self.closing:
                    return
                job = await self._take()
                if job is None:
                    continue
            # A job in hand is run even when closing: it is already active and locked.
            job = await self._run(job, job.token)

    async def _take(self) -> Job | None:
        """The next job, waiting while the queue is drained; None when closing."""
        while not self.closing:
            if self.waiting is not None:  # another slot is blocked on Redis for the next job
                await self._park()
                continue
            token = f"{self.id}:{next(self._tokens)}"
            try:
                await self.backoff.wait()
                job: Job | None = await self.getNextJob(token)
            except asyncio.CancelledError:
                if self.closing:
                    return None
                raise
            except Exception as exc:  # Redis out of memory or down: every slot backs off
                if self.closing:
                    return None
                await self.backoff.failed("take", exc)
                continue
            self.backoff.succeeded()
            if job is not None:
                self._wake_one()  # more may be waiting: let one more idle slot look
                return job
        return None

    async def _park(self) -> None:
        waiter: asyncio.Future[None] = asyncio.get_running_loop().create_future()
        self._parked.append(waiter)
        try:
            await waiter
        finally:
            if not waiter.done():
                waiter.cancel()

    def _wake_one(self) -> None:
        while self._parked:
            waiter = self._parked.popleft()
            if not waiter.done():
                waiter.set_result(None)
                return

    def _wake_all(self) -> None:
        while self._parked:
            waiter = self._parked.popleft()
            if not waiter.done():
                waiter.set_result(None)

    # --- one job --------------------------------------------------------------------------

    async def _run(self, job: Job, token: str) -> Job | None:
        """bullmq's `processJob`, finishing with `fetchNext`; returns the next job, if any."""
        opts = job.opts
        if "removeOnComplete" not in opts and "removeOnComplete" in self.opts:
            opts["removeOnComplete"] = self.opts["removeOnComplete"]
        if "removeOnFail" not in opts and "removeOnFail" in self.opts:
            opts["removeOnFail"] = self.opts["removeOnFail"]
        self.jobs.add((job, token))
        self.lockManager.track_job(job.id, token, int(time.time() * 1000))
        try:
            # A job BullMQ marked to fail (`deferredFailure`, stalled too often) goes to the
            # processor too: it fails it with its own outcome records (`JobHandle`).
            result = await self.processor(job, token)
            if self.forceClosing:
                return None
            # The provider's answer is in hand: a Redis refusing the finish is waited out (the
            # job stays active and locked meanwhile), never a reason to run the job again.
            following = await self.persist(
                "finish",
                lambda: self._complete(job, result, token, fetch_next=not self.closing),
            )
            job.returnvalue = result
            job.attemptsMade = job.attemptsMade + 1
            self.emit("completed", job, result)
            return following
        except (DelayedError, WaitingChildrenError):
            await self.persist("log", lambda: self._flush_logs(job))
            return None
        except Exception as err:
            error = err  # named outside the handler: the retried call below closes over it
            try:
                await self.persist("log", lambda: self._flush_logs(job))
                if not self.forceClosing:
                    await self.persist("fail", lambda: job.moveToFailed(error, token))
                self.emit("failed", job, err)
            except Exception as failure:
                self.emit("error", failure, job)
            return None
        finally:
            self.jobs.discard((job, token))
            self.lockManager.untrack_job(job.id)

    async def persist(self, operation: str, call: Callable[[], Awaitable[T]]) -> T:
        """`call()`, retried with the slots' shared backoff while Redis refuses it (out of
        memory, unreachable, a replica during a failover); other errors, and any error once
        force-closing, propagate. For what must not fail once a provider has answered: the
        finish, and the decision between a cancel and that finish (`JobHandle.may_finish`)."""
        while True:
            try:
                outcome = await call()
            except REDIS_TROUBLE as exc:
                if self.forceClosing:
                    raise
                await self.backoff.failed(operation, exc)
                continue
            self.backoff.succeeded()
            return outcome

    async def _complete(self, job: Job, result: Any, token: str, *, fetch_next: bool) -> Job | None:
        """`moveToFinished` (completed), the job's pending log lines and the trim of its data,
        in this turn's pipeline."""
        scripts = self.scripts
        keys, args = scripts.moveToCompletedArgs(
            job, result, job.opts.get("removeOnComplete", False), token, fetch_next
        )
        script = scripts.commands["moveToFinished"]
        lines = list(getattr(job, PENDING_LOGS, None) or ())
        logs_key = self.backend.toKey(f"{job.id}:logs")
        trimmed: str | None = getattr(job, TRIMMED_DATA, None)
        trim_keys = [self.backend.toKey(job.id), self.backend.toKey("completed")]

        def build(pipe: Any) -> None:
            if lines:
                pipe.rpush(logs_key, *lines)
            pipe.evalsha(script.sha, len(keys), *keys, *args)
            if trimmed is not None:
                pipe.evalsha(self._trim.sha, 2, *trim_keys, job.id, trimmed)

        replies = await self.pipelined(build, int(bool(lines)) + 1 + int(trimmed is not None))
        raw = replies[1 if lines else 0]
        if isinstance(raw, NoScriptError):  # a restarted Redis forgot it: load and run it
            raw = await script(keys=keys, args=args)
        elif isinstance(raw, Exception):
            raise raw
        getattr(job, PENDING_LOGS, []).clear()
        if trimmed is not None and isinstance(replies[-1], Exception):
            # Best effort: the job completed; only the memory its prompt holds is not freed.
            log.debug("job %s: data not trimmed: %s", job.id, replies[-1])
        if isinstance(raw, int) and raw < 0:
            raise scripts.finishedErrors(
                {"code": raw, "jobId": job.id, "command": "moveToFinished", "state": "active"}
            )
        if not fetch_next or not raw:
            return None
        job_data, job_id, limit_until, delay_until = raw2NextJobData(raw)
        following: Job | None = await self.nextJobFromJobData(
            job_data, job_id, limit_until or 0, delay_until or 0, token
        )
        if following is not None:
            self.emit("active", following, "waiting")
        return following

    async def pipelined(self, build: Callable[[Any], None], count: int) -> list[Any]:
        """Run the `count` commands `build(pipe)` adds, in one pipeline with every other slot's
        commands of this event-loop turn; their replies (errors as exception objects)."""
        return await self._batch.run(build, count)

    async def _flush_logs(self, job: Job) -> None:
        lines = getattr(job, PENDING_LOGS, None)
        if lines:
            await self.client.rpush(self.backend.toKey(f"{job.id}:logs"), *lines)
            lines.clear()

    async def close(self, force: bool = False) -> None:
        self.closing = True  # before waking the parked slots, so they see it and end
        self._wake_all()
        await super().close(force)


def _why(task: asyncio.Task[None]) -> str:
    if task.cancelled():
        return "cancelled"
    exc = task.exception()
    return "returned" if exc is None else f"{type(exc).__name__}: {exc}"


class TurnPipeline:
    """Commands issued by many tasks in one event-loop turn, sent to Redis as one pipeline.

    Why: at hundreds of jobs in flight, the worker's Redis cost is mostly one socket write and
    one read per round trip, not the commands. Slots that finish or start jobs in the same turn
    (their replies arrived together) share one round trip; a lone command waits for nothing
    more than the end of the current turn.
    """

    def __init__(self, client: Any) -> None:
        self._client = client
        self._queued: list[tuple[Callable[[Any], None], int, asyncio.Future[list[Any]]]] = []
        self._sending: set[asyncio.Task[None]] = set()

    def run(self, build: Callable[[Any], None], count: int) -> asyncio.Future[list[Any]]:
        loop = asyncio.get_running_loop()
        future: asyncio.Future[list[Any]] = loop.create_future()
        if not self._queued:
            loop.call_soon(self._flush)
        self._queued.append((build, count, future))
        return future

    def _flush(self) -> None:
        batch, self._queued = self._queued, []
        task = asyncio.ensure_future(self._send(batch))
        self._sending.add(task)
        task.add_done_callback(self._sending.discard)

    async def _send(self, batch: list[tuple[Callable[[Any], None], int, Any]]) -> None:
        pipe = self._client.pipeline(transaction=False)
        try:
            for build, _, _ in batch:
                build(pipe)
            replies = await pipe.execute(raise_on_error=False)
        except asyncio.CancelledError:
            for _, _, future in batch:
                future.cancel()
            raise
        except Exception as exc:
            for _, _, future in batch:
                if not future.done():
                    future.set_exception(exc)
            return
        start = 0
        for _, count, future in batch:
            if not future.done():
                future.set_result(replies[start : start + count])
            start += count
