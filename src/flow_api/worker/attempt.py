"""One owner of an attempt's life: a chain of steps, one retry decision, one cancel path.

An attempt runs each step's `before` in order, then the provider call; then each entered step's
`after` (on success) or `on_error` (on failure) in reverse order, and `release` in every case,
shutdown included. In the spirit of taskiq's middlewares: each concern (deadline, quota,
provider turn, rate budget, record) is one step, and none of them decides alone whether the
job is retried or what a cancel means.

- The retry decision is `AttemptChain.final`, made once, and every step sees it.
- A client's cancel interrupts the attempt only while its steps run `before` or the provider is
  called; it is turned into `JobCancelled` here and nowhere else. Afterwards, before the job
  ends (with a result, or a final failure), the cancel and that end are decided once, atomically
  in Redis (`JobHandle.may_finish`): a cancel that came first turns the outcome into
  `JobCancelled` (an answer already received is discarded and its tokens refunded); one that
  comes later answers `job_already_finished`.
- Whatever else goes wrong becomes a `FlowError` (a lost Redis: `QueueUnavailable`; a bug:
  `WorkerFault`), so the queue always receives an outcome and the worker's slot goes on.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from flow_api.budget import Ticket
from flow_api.errors import FlowError, JobCancelled, QueueUnavailable, WorkerFault
from flow_api.jobs import JobData
from flow_api.models import Generation
from flow_api.providers import Provider
from flow_api.queue.connection import REDIS_DOWN, RedisOutOfMemory, out_of_memory
from flow_api.queue.consumer import AttemptFailed, JobHandle

if TYPE_CHECKING:
    from flow_api.streaming.writer import AttemptStream

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Attempt:
    """One try at a job, filled in by the steps as it goes."""

    job: JobHandle
    data: JobData | None = None
    provider: Provider | None = None
    model: str = ""
    timeout_s: float = 0.0
    ticket: Ticket | None = None
    cancelled_before_start: bool = False
    started_before: bool = False
    """An earlier attempt of this job started (its start deadline no longer applies)."""
    started_ms: int | None = None
    """When this attempt's start was written (`Record`): the time the deadline is checked at,
    the same one the job's views read, so they and the worker never disagree."""
    calling: bool = False
    generation: Generation | None = None
    on_token: Callable[[str], None] | None = None
    """Receives the answer's text as the provider produces it (set by the `Stream` step)."""
    stream: AttemptStream | None = None

    @property
    def number(self) -> int:
        return self.job.attempt


class Step:
    """One concern of an attempt. Every hook is optional.

    `after`, `on_error` and `release` run only for steps whose `before` completed, except
    `on_error` of a step marked `always_on_error` (recording the outcome, settling the quota):
    it also sees errors raised before it was reached (a cancel during a budget wait).
    """

    always_on_error = False

    async def before(self, attempt: Attempt) -> None:
        """Before the provider call; raising ends the attempt with that error."""

    async def after(self, attempt: Attempt) -> None:
        """After a successful call, in reverse order of `before`."""

    async def on_error(self, attempt: Attempt, error: FlowError, final: bool) -> None:
        """After a failure (`final`: no other attempt follows), in reverse order of `before`."""

    def release(self, attempt: Attempt) -> None:
        """Always, last, without awaiting: also on shutdown, when no other hook runs."""


Call = Callable[[Attempt], Awaitable[Generation]]


class AttemptChain:
    """Runs attempts through `steps` and `call`; the queue consumer's handler."""

    def __init__(self, steps: Sequence[Step], call: Call) -> None:
        self.steps = list(steps)
        self.call = call
        # Which steps have each hook: a no-op hook is not awaited (at hundreds of jobs a second
        # every coroutine counts in the worker's CPU per job).
        self._with = {
            hook: {id(s) for s in self.steps if getattr(type(s), hook) is not getattr(Step, hook)}
            for hook in ("before", "after", "release")
        }

    @staticmethod
    def final(attempt: Attempt, error: FlowError) -> bool:
        """The one retry decision: no other attempt follows this failure."""
        return not error.retryable or attempt.number >= attempt.job.max_attempts

    async def __call__(self, job: JobHandle) -> dict[str, Any]:
        attempt = Attempt(job)
        entered: list[Step] = []
        try:
            try:
                await self._run(attempt, entered)
                if not await _may_finish(job):
                    raise JobCancelled(
                        "cancelled as the provider answered; the answer was discarded"
                    )
            except FlowError as error:
                final = self.final(attempt, error)
                if final and not isinstance(error, JobCancelled | QueueUnavailable):
                    error = await _or_cancelled(job, error)
                for step in reversed(self.steps):
                    if step in entered or step.always_on_error:
                        await step.on_error(attempt, error, final)
                raise AttemptFailed(error, final=final) from error
            for step in reversed(entered):
                if id(step) in self._with["after"]:
                    await step.after(attempt)
        finally:
            for step in reversed(entered):
                if id(step) in self._with["release"]:
                    step.release(attempt)
        assert attempt.generation is not None
        return attempt.generation.wire()

    async def _run(self, attempt: Attempt, entered: list[Step]) -> None:
        """The steps' `before` and the call: the part a client's cancel may interrupt."""
        job = attempt.job
        try:
            for step in self.steps:
                if id(step) in self._with["before"]:
                    await step.before(attempt)
                entered.append(step)
            attempt.calling = True
            attempt.generation = await self.call(attempt)
        except asyncio.CancelledError:
            if not job.cancelled_by_client:
                raise  # shutdown: the consumer hands the job back, no outcome recorded
            _uncancel()
            raise JobCancelled(
                "cancelled while running; the provider call was aborted"
                if attempt.calling
                else "cancelled before it started; no provider call was made"
            ) from None
        except FlowError:
            raise
        except RedisOutOfMemory as exc:  # retried like a lost Redis, never "unexpected"
            raise out_of_memory() from exc
        except REDIS_DOWN as exc:
            raise QueueUnavailable(f"the job store is unreachable: {type(exc).__name__}") from exc
        except Exception as exc:
            log.exception("job %s: unexpected error in attempt %d", job.id, attempt.number)
            raise WorkerFault(f"unexpected error in the worker: {type(exc).__name__}") from exc
        finally:
            job.cancellable = False  # from here on a cancel is too late to interrupt


async def _may_finish(job: JobHandle) -> bool:
    """`JobHandle.may_finish`, which waits out a Redis refusing writes; one still lost when
    the worker is force-closing is `QueueUnavailable` (the attempt is retried)."""
    try:
        return await job.may_finish()
    except REDIS_DOWN as exc:
        raise QueueUnavailable(f"the job store is unreachable: {type(exc).__name__}") from exc


async def _or_cancelled(job: JobHandle, error: FlowError) -> FlowError:
    """The error a final failure ends the job with: `JobCancelled` if a client's cancel came
    first (its 200 promised `cancelled`), else `error`. Undecidable (Redis lost): `error`."""
    try:
        if await job.may_finish():
            return error
    except REDIS_DOWN:
        return error
    return JobCancelled(f"cancelled before the attempt ended ({error.code}); not retried")


def _uncancel() -> None:
    # The cancel was handled: later awaits of this task (the next job in this slot, and
    # asyncio.timeout's own bookkeeping) must not see it as still pending.
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()
