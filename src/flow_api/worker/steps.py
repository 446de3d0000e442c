"""The steps of an attempt, in the order they run (see `attempt.py` for the chain)."""

from __future__ import annotations

import asyncio
import logging

from flow_api import history
from flow_api.auth.quota import TokenQuota
from flow_api.auth.spend import MICROS, SpendCap
from flow_api.budget import RateBudget
from flow_api.errors import (
    FlowError,
    JobCancelled,
    JobExpired,
    ProviderTimeout,
    WorkerLost,
)
from flow_api.jobs import JobData, now_ms
from flow_api.models import Generation
from flow_api.pipeline import generate
from flow_api.providers import ProviderRegistry
from flow_api.settings import WorkerSettings
from flow_api.streaming.writer import StreamWriter
from flow_api.worker.attempt import Attempt, Step

log = logging.getLogger(__name__)


class Quota(Step):
    """Settles the key's token reservation once the job's outcome is final.

    A completed job's reservation becomes the provider's reported total (the estimate stands
    when a provider reports none); a job that ends without a result is refunded, since
    providers do not bill failed calls. A job retried, deferred or handed back on shutdown keeps
    its reservation for the next attempt.
    """

    always_on_error = True

    def __init__(self, quota: TokenQuota, spend: SpendCap | None = None) -> None:
        self.quota = quota
        self.spend = spend

    async def after(self, attempt: Attempt) -> None:
        total = attempt.generation.usage.total_tokens if attempt.generation is not None else 0
        await self._settle(attempt, total if total > 0 else None)
        cost = attempt.generation.cost if attempt.generation is not None else None
        await self._settle_spend(attempt, round(cost.amount * MICROS) if cost else None)

    async def on_error(self, attempt: Attempt, error: FlowError, final: bool) -> None:
        if final:
            await self._settle(attempt, 0)
            await self._settle_spend(attempt, 0)

    async def _settle_spend(self, attempt: Attempt, micros: int | None) -> None:
        """The key's spend cap: the job's real cost replaces its reservation (the reservation
        stands when the job has no cost)."""
        charge = attempt.data.spend if attempt.data is not None else None
        if charge is None or self.spend is None:
            return
        try:
            await self.spend.settle(
                charge, charge.tokens if micros is None else micros, attempt.job.id
            )
        except FlowError as exc:  # the job's outcome matters more than the ledger
            log.warning("job %s: spend not recorded: %s", attempt.job.id, exc.code)

    async def _settle(self, attempt: Attempt, used: int | None) -> None:
        charge = attempt.data.charge if attempt.data is not None else None
        if charge is None:
            return
        try:
            await self.quota.settle(charge, charge.tokens if used is None else used, attempt.job.id)
        except FlowError as exc:  # the job's outcome matters more than the ledger
            log.warning("job %s: token usage not recorded: %s", attempt.job.id, exc.code)


class Resolve(Step):
    """Reads the job's envelope and picks its provider, model and time limit."""

    def __init__(self, registry: ProviderRegistry, settings: WorkerSettings) -> None:
        self.registry = registry
        self.settings = settings

    async def before(self, attempt: Attempt) -> None:
        data = attempt.data = _capped(attempt.job.data)  # raises InvalidRequest if not ours
        options = data.request.options
        provider = attempt.provider = self.registry.get(data.provider or options.provider)
        attempt.model = data.model or provider.resolve_model(options.model)
        timeout_ms = options.timeout_ms
        limit_s = timeout_ms / 1000 if timeout_ms else self.settings.job_timeout_s
        # The API refuses a larger timeoutMs; a job queued before the maximum was lowered (or
        # by another producer) gets the maximum, which the SDK clients' own timeout exceeds.
        attempt.timeout_s = min(
            limit_s, max(self.settings.max_job_timeout_s, self.settings.job_timeout_s)
        )


class CrashLimit(Step):
    """Fails, before any provider call, a job BullMQ's stalled check gave up on: its workers
    stopped while running it more than `FLOW_WORKER_MAX_STALLED` times. Failed here, after
    `Resolve`, it is settled and recorded like any final failure (quota refunded, the attempt's
    end in its history) rather than moved to failed behind the handler's back."""

    def __init__(self, settings: WorkerSettings) -> None:
        self.max_stalled = settings.max_stalled

    async def before(self, attempt: Attempt) -> None:
        if attempt.job.stalled_too_often:
            raise WorkerLost(
                f"its worker stopped while running it (a crash, a kill or a lost Redis) more "
                f"than {self.max_stalled} times (FLOW_WORKER_MAX_STALLED); not run again"
            )


def _capped(data: JobData) -> JobData:
    """A job whose key reserved quota for a completion of N tokens, and that set no `maxTokens`,
    is called with `maxTokens` N: the reservation stays an upper bound of what it spends."""
    charge, options = data.charge, data.request.options
    if charge is None or charge.completion is None or options.max_tokens is not None:
        return data
    capped = options.model_copy(update={"max_tokens": charge.completion})
    return data.model_copy(update={"request": data.request.model_copy(update={"options": capped})})


class Budget(Step):
    """Takes the call's place in the model's shared rate budget and settles it after.

    Waiting for budget puts the job back without spending an attempt (`JobDeferred`); so does a
    429, which also cools the model down for every worker.
    """

    def __init__(self, budget: RateBudget) -> None:
        self.budget = budget

    async def before(self, attempt: Attempt) -> None:
        assert attempt.data is not None and attempt.provider is not None
        attempt.ticket = await self.budget.admit(
            attempt.job, attempt.provider.name, attempt.model, attempt.data.request
        )

    async def after(self, attempt: Attempt) -> None:
        if attempt.ticket is not None and attempt.generation is not None:
            await self.budget.settle(attempt.ticket, attempt.generation)

    async def on_error(self, attempt: Attempt, error: FlowError, final: bool) -> None:
        # Tokens back at once; after a 429 back to the queue, no attempt spent.
        if attempt.ticket is not None:
            await self.budget.failed(attempt.job, attempt.ticket, error)


class Record(Step):
    """Writes the attempt's start and end into the job's history (the end of every failed
    attempt, even one that failed before its start was written)."""

    always_on_error = True

    async def before(self, attempt: Attempt) -> None:
        assert attempt.provider is not None
        entry = history.attempt_started(attempt.number, attempt.provider.name, attempt.model)
        begun = await attempt.job.begin(entry)
        attempt.cancelled_before_start = begun.cancelled
        attempt.started_before = begun.started_before
        attempt.started_ms = entry["at"]

    async def after(self, attempt: Attempt) -> None:
        # Written in the same round trip as the result; DEBUG, not INFO: at hundreds of jobs/s
        # a line per success was 1-3% of the worker's CPU (py-spy).
        attempt.job.log_at_finish(history.attempt_ended(attempt.number, None))
        log.debug("job %s completed on attempt %d", attempt.job.id, attempt.number)

    async def on_error(self, attempt: Attempt, error: FlowError, final: bool) -> None:
        job = attempt.job
        await job.log(history.attempt_ended(attempt.number, error))
        retry = "" if final else " (will retry)"
        log.info(
            "job %s attempt %d/%d failed: %s%s",
            job.id,
            attempt.number,
            job.max_attempts,
            error.code,
            retry,
        )


class Gate(Step):
    """Ends the attempt before the call when a client cancelled or the start deadline passed."""

    async def before(self, attempt: Attempt) -> None:
        if attempt.cancelled_before_start:
            raise JobCancelled("cancelled before it started; no provider call was made")
        data = attempt.data
        assert data is not None
        # Checked at the start `Record` wrote, as the views do (`history`): a start written in
        # time is in time, however long the round trip took. A job that started once (then
        # was retried, handed back on shutdown, or put back after a 429) is never expired.
        now = attempt.started_ms or now_ms()
        if data.expired(now, started_before=attempt.number > 1 or attempt.started_before):
            late = (now - (data.start_by_ms or now)) / 1000
            raise JobExpired(f"not started before its deadline (startWithinMs); {late:.1f} s late")


class ProviderTurn(Step):
    """Waits for a turn on providers with a concurrency cap (the local model)."""

    def __init__(self, registry: ProviderRegistry) -> None:
        self._turns = {
            name: asyncio.Semaphore(provider.max_concurrency)
            for name, provider in registry.providers.items()
            if provider.max_concurrency
        }

    async def before(self, attempt: Attempt) -> None:
        assert attempt.provider is not None
        turn = self._turns.get(attempt.provider.name)
        if turn is not None:
            await turn.acquire()

    def release(self, attempt: Attempt) -> None:
        assert attempt.provider is not None
        turn = self._turns.get(attempt.provider.name)
        if turn is not None:
            turn.release()


class Stream(Step):
    """Writes the attempt to the job's stream (`GET /api/ai/stream/{jobId}`): its start, its
    tokens as the provider produces them, a retry, and the job's outcome once decided.

    Tokens are asked of the provider (a streamed call) when a client watches the job as the
    attempt starts (`FLOW_STREAM_TOKENS=watched`, the default), or always: a streamed call
    costs the worker several times the CPU of a whole answer (each chunk is parsed by the SDK
    and built into LangChain messages), so unwatched jobs keep the cheap path and their text
    comes as one event when the attempt ends.

    Last before the call, so `active` means the provider call begins; `always_on_error`, so a
    job that ends before (cancelled or expired at the gate, a budget refusal) ends its stream.
    """

    always_on_error = True

    def __init__(self, writer: StreamWriter, tokens: str) -> None:
        self.writer = writer
        self.tokens = tokens

    async def before(self, attempt: Attempt) -> None:
        stream = attempt.stream = self.writer.attempt(attempt.job.id, attempt.number)
        stream.started()
        if self.tokens == "always" or (
            self.tokens == "watched" and await self.writer.watched(attempt.job.id)
        ):
            attempt.on_token = stream.token

    async def after(self, attempt: Attempt) -> None:
        stream, generation = attempt.stream, attempt.generation
        assert stream is not None and generation is not None
        if attempt.on_token is None:  # not streamed: the whole text in one event
            stream.token(generation.text)
        stream.ended("completed")

    async def on_error(self, attempt: Attempt, error: FlowError, final: bool) -> None:
        stream = attempt.stream or self.writer.attempt(attempt.job.id, attempt.number)
        if not final:
            stream.retrying(error.to_dict())
        elif isinstance(error, JobCancelled):
            stream.ended("cancelled")
        elif isinstance(error, JobExpired):
            stream.ended("expired")
        else:
            stream.ended("failed")


async def call_provider(attempt: Attempt) -> Generation:
    """The provider call itself: the LangChain pipeline under the attempt's time limit."""
    assert attempt.data is not None and attempt.provider is not None
    observe = attempt.ticket.observe if attempt.ticket is not None else None
    try:
        async with asyncio.timeout(attempt.timeout_s):
            return await generate(
                attempt.provider,
                attempt.model,
                attempt.data.request,
                observe=observe,
                on_token=attempt.on_token,
            )
    except TimeoutError:
        raise ProviderTimeout(
            f"the provider call exceeded the {attempt.timeout_s:g} s timeout"
        ) from None
