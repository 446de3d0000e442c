"""The workers' side of the shared provider rate budgets: before, after and on failure of a call.

A call that cannot start now is not refused: the ledger hands the job the next free start time
and *reserves* it. The worker puts the job back in BullMQ's delayed set until then
(`JobHandle.defer`: no attempt spent, no slot held) and the job, when it comes back, starts on
its reservation. Waits shorter than `FLOW_BUDGET_INLINE_WAIT_MS` are slept in the slot instead.
Places are reserved at most `FLOW_BUDGET_HORIZON_MS` ahead; jobs further back are told when to
come back and reserve then, at the estimates of that time.

Put-backs are bounded: after `FLOW_BUDGET_MAX_DEFERRALS` of them (429s and budget waits alike),
a job that would wait again fails its attempt with `provider_rate_limited` instead, and is
retried with backoff like any retryable error, then fails with that reason.

Every worker reads the model's shared state before every call (one script run), so a 429's
cooldown, set by whichever worker met it, holds every worker, including those that never called
that model, and limits learned from one worker's answers pace every worker.
"""

from __future__ import annotations

import asyncio
import logging
import math
from dataclasses import dataclass, field
from types import TracebackType
from typing import Any

from redis.asyncio import Redis

from flow_api.budget.charges import DECAY, Averages, ChargeModel
from flow_api.budget.dimensions import DIMENSIONS, Amounts, Dimension
from flow_api.budget.headers import Gauge, read_gauges
from flow_api.budget.ledger import (
    KEEP_MS,
    KNOWN_TTL_MS,
    MINUTE_MS,
    PROBE_MS,
    PROBE_POLL_MS,
    Correction,
    Decision,
    Ledger,
)
from flow_api.errors import FlowError, ProviderRateLimited
from flow_api.jobs import now_ms
from flow_api.keys import (
    budget_key,
    budget_known_key,
    budget_probe_key,
    budget_reservation_key,
    budget_wake_key,
)
from flow_api.models import GenerateRequest, Generation
from flow_api.providers.ratelimit_headers import RATELIMIT_FIELD
from flow_api.queue.connection import connect, redis_errors_as_unavailable
from flow_api.queue.consumer import JobHandle
from flow_api.settings import BudgetSettings, Settings

log = logging.getLogger(__name__)


@dataclass(slots=True)
class Ticket:
    """One admitted call: what it reserved, to be settled after it."""

    provider: str
    model: str
    charge: Amounts  # what was reserved
    chars: int  # prompt and system characters, to learn tokens per character
    max_tokens: int | None  # the request's own maxTokens
    limits: Amounts  # the limits it was charged against
    checked: bool  # whether the ledger was consulted (else nothing to settle)
    probe: bool = False  # the one call that goes while nothing is known of the model
    start_ms: int = 0  # when the call was let go
    headers: dict[str, str] | None = field(default=None)

    @property
    def tokens(self) -> int:
        """The tokens reserved (prompt plus completion)."""
        return self.charge.tokens

    def observe(self, metadata: dict[str, Any]) -> None:
        """Hook for the pipeline: the model message's `response_metadata` (headers land here)."""
        self.headers = metadata.get(RATELIMIT_FIELD)


class RateBudget:
    """The workers' side of the shared rate budgets. No connection until entered; entered with
    `redis` (the worker process's pool), it uses that one and leaves it open."""

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings: BudgetSettings = settings.budget
        self.queue_name = settings.redis.queue_name
        self._weights = settings.worker.tenant_weights
        self._redis_settings = settings.redis
        self._pool = redis
        self._redis: Redis | None = None
        self._ledger: Ledger | None = None
        # What this worker last heard of each model's shared state (limits and averages).
        self._limits: dict[tuple[str, str], Amounts] = {}
        self._averages: dict[tuple[str, str], Averages] = {}

    async def __aenter__(self) -> RateBudget:
        self._redis = self._pool or connect(self._redis_settings)
        self._ledger = Ledger(self._redis)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        redis, self._redis, self._ledger = self._redis, None, None
        if redis is not None and redis is not self._pool:
            await redis.aclose()

    # --- what is known ----------------------------------------------------------------------

    def configured(self, provider: str, model: str) -> Amounts | None:
        """Limits from `FLOW_BUDGET_LIMITS` (`provider/model`, else `provider/*`), if any."""
        limits = self.settings.limits
        limit = limits.get(f"{provider}/{model}") or limits.get(f"{provider}/*")
        if limit is None:
            return None
        return Amounts(limit.rpm or 0, limit.tpm or 0, limit.itpm or 0, limit.otpm or 0)

    def limits_for(self, provider: str, model: str) -> Amounts:
        """Configured limits, else the ones learned (by any worker) from the headers."""
        configured = self.configured(provider, model)
        if configured is not None:
            return configured
        return self._limits.get((provider, model), Amounts())

    def charges(self, provider: str, model: str) -> ChargeModel:
        return ChargeModel(provider, model, self.settings.completion_tokens)

    def estimate(self, provider: str, model: str, request: GenerateRequest) -> int:
        """Tokens a request is charged up front (prompt plus completion; see `charges.py`)."""
        averages = self._averages.get((provider, model), Averages())
        return self._charge(provider, model, request, averages).tokens

    # --- the moments of a call --------------------------------------------------------------

    async def admit(
        self, job: JobHandle, provider: str, model: str, request: GenerateRequest
    ) -> Ticket:
        """Reserve this call's place in the model's budget. Returns at (or just before) the
        reserved start; when that is further off, puts the job back until then (raises
        `JobDeferred` through `job.defer`). A job put back too often fails this attempt with
        `ProviderRateLimited` instead."""
        chars = len(request.prompt) + len(request.options.system or "")
        max_tokens = request.options.max_tokens
        if not self.settings.enabled or self._ledger is None:
            charge = self._charge(provider, model, request, Averages())
            return Ticket(provider, model, charge, chars, max_tokens, Amounts(), False)
        key = (provider, model)
        if key not in self._averages:
            self._averages[key] = await self._read_averages(provider, model)
        charge = self._charge(provider, model, request, self._averages[key])
        may_defer = job.starts - job.attempt < self.settings.max_deferrals
        decision = await self._before(job, provider, model, charge, may_defer)
        self._remember(key, decision)
        ticket = Ticket(
            provider,
            model,
            charge,
            chars,
            max_tokens,
            decision.limits,
            True,
            decision.probe,
            decision.start_ms,
        )
        if decision.go == 1:
            wait = (decision.start_ms - now_ms()) / 1000
            if wait > 0:
                await asyncio.sleep(wait)
            return ticket
        if decision.go < 0:
            wait_s = max(decision.start_ms - now_ms(), 0) / 1000
            raise ProviderRateLimited(
                f"waited for the {provider}/{model} rate budget {job.starts - job.attempt} "
                f"times (FLOW_BUDGET_MAX_DEFERRALS); still {wait_s:.1f} s to go",
                retry_after=wait_s,
            )
        if await job.cancel_requested():
            return ticket  # let the attempt start and end as cancelled, without a call
        log.debug(
            "job %s waits %d ms for %s/%s budget",
            job.id,
            decision.start_ms - now_ms(),
            provider,
            model,
        )
        await job.defer(decision.start_ms)

    async def settle(self, ticket: Ticket, generation: Generation) -> None:
        """After an answer: charge what the provider charged, learn from its headers."""
        if not ticket.checked or not (ticket.limits.any or ticket.probe or ticket.headers):
            return  # a model known to have no limits, and an answer with nothing to teach
        usage = generation.usage
        model = self.charges(ticket.provider, ticket.model)
        if usage.total_tokens > 0:
            actual = model.after(usage.prompt_tokens, usage.completion_tokens, ticket.max_tokens)
            delta = actual.minus(ticket.charge)
            prompt, completion = usage.prompt_tokens, usage.completion_tokens
        else:  # the provider reported nothing: the estimate stands
            delta, prompt, completion = Amounts(), -1, -1
        try:
            await self._after(ticket, delta, ticket.headers, True, 0, prompt, completion)
        except FlowError as exc:  # the job's outcome matters more than the ledger
            log.warning("budget of %s/%s not corrected: %s", ticket.provider, ticket.model, exc)

    async def failed(self, job: JobHandle, ticket: Ticket, error: FlowError) -> None:
        """After a failed call: give its tokens back at once. After a 429, also learn from its
        headers, cool the model down for every worker and put the job back without spending an
        attempt (raises `JobDeferred`); returns when the job has been put back too often, so
        that the caller fails the attempt as usual."""
        limited = isinstance(error, ProviderRateLimited)
        if not ticket.checked or not (ticket.limits.any or ticket.probe or limited):
            return
        refund = Amounts(0, -ticket.charge.tokens, -ticket.charge.input, -ticket.charge.output)
        if not isinstance(error, ProviderRateLimited):  # (`limited`, spelled out for mypy)
            try:
                await self._after(ticket, refund, None, False, 0, -1, -1)
            except FlowError as exc:
                log.warning("budget of %s/%s not refunded: %s", ticket.provider, ticket.model, exc)
            return
        wait_s = error.retry_after or _reset_s(read_gauges(error.ratelimit))
        cool = now_ms() + round((wait_s or self.settings.cooldown_s) * 1000)
        until = await self._after(ticket, refund, error.ratelimit, bool(error.ratelimit), cool)
        if job.starts - job.attempt >= self.settings.max_deferrals:
            return
        await job.defer(max(until, cool))

    async def rate_limited(
        self, job: JobHandle, ticket: Ticket, error: ProviderRateLimited
    ) -> None:
        """After a 429 (see `failed`)."""
        await self.failed(job, ticket, error)

    # --- internals --------------------------------------------------------------------------

    def _charge(
        self, provider: str, model: str, request: GenerateRequest, averages: Averages
    ) -> Amounts:
        chars = len(request.prompt) + len(request.options.system or "")
        return self.charges(provider, model).before(chars, request.options.max_tokens, averages)

    def _keys(self, provider: str, model: str) -> tuple[str, str, str]:
        q = self.queue_name
        return (
            budget_key(q, provider, model),
            budget_known_key(q, provider, model),
            budget_probe_key(q, provider, model),
        )

    async def _read_averages(self, provider: str, model: str) -> Averages:
        assert self._redis is not None
        _, known, _ = self._keys(provider, model)
        with redis_errors_as_unavailable():
            per_char, completion = await self._redis.hmget(known, ["pc", "cp"])
        return _averages(per_char, completion)

    def _remember(self, key: tuple[str, str], decision: Decision) -> None:
        learned = decision.limits
        if learned.any and self._limits.get(key) != learned:
            log.info("%s/%s limits: %s", key[0], key[1], learned)
        self._limits[key] = learned
        per_char = decision.per_char or self._averages.get(key, Averages()).per_char
        self._averages[key] = Averages(per_char, decision.completion)

    async def _before(
        self, job: JobHandle, provider: str, model: str, charge: Amounts, may_defer: bool
    ) -> Decision:
        assert self._ledger is not None
        budget, known, probe = self._keys(provider, model)
        configured = self.configured(provider, model)
        limits = configured.as_list() if configured is not None else [-1, -1, -1, -1]
        s = self.settings
        with redis_errors_as_unavailable():
            return await self._ledger.before(
                [
                    budget,
                    budget_reservation_key(self.queue_name, provider, model, job.id),
                    known,
                    probe,
                    budget_wake_key(self.queue_name, provider, model, job.data.tenant),
                ],
                [
                    now_ms(),
                    *limits,
                    *charge.as_list(),
                    1 - s.headroom,
                    s.inline_wait_ms,
                    KEEP_MS,
                    s.horizon_ms,
                    int(may_defer),
                    PROBE_MS,
                    PROBE_POLL_MS,
                    KNOWN_TTL_MS,
                    1.0 / self._weights.get(job.data.tenant, 1.0),
                ],
            )

    async def _after(
        self,
        ticket: Ticket,
        delta: Amounts,
        headers: dict[str, str] | None,
        answered: bool,
        cool_until: int,
        prompt: int = -1,
        completion: int = -1,
    ) -> int:
        assert self._ledger is not None
        gauges = read_gauges(headers)
        learn = self.settings.learn_from_headers
        share = 1 - self.settings.headroom
        corrections: list[int] = []
        elapsed_ms = max(now_ms() - ticket.start_ms, 0)
        for dim in DIMENSIONS:
            gauge = gauges.get(dim)
            corrections += _correction(ticket, dim, delta, gauge, elapsed_ms, share).args()
        with redis_errors_as_unavailable():
            return await self._ledger.after(
                list(self._keys(ticket.provider, ticket.model)),
                [
                    now_ms(),
                    KEEP_MS,
                    KNOWN_TTL_MS,
                    1 - self.settings.headroom,
                    int(answered),
                    int(ticket.probe),
                    cool_until,
                    ticket.chars,
                    prompt,
                    completion,
                    DECAY,
                    int(learn),
                    *corrections,
                ],
            )


def _correction(
    ticket: Ticket,
    dim: Dimension,
    delta: Amounts,
    gauge: Gauge | None,
    elapsed_ms: int,
    share: float,
) -> Correction:
    # The next call is assumed to need what this one was charged (one request, for requests).
    next_charge = 1 if dim is Dimension.REQUESTS else ticket.charge.of(dim)
    if gauge is None:
        return Correction(ticket.limits.of(dim), delta.of(dim), next_charge=next_charge)
    return Correction(
        ticket.limits.of(dim),
        delta.of(dim),
        gauge.limit,
        -1 if gauge.remaining is None else gauge.remaining,
        -1 if gauge.reset_s is None else round(gauge.reset_s * 1000),
        # `remaining` was counted when this call was admitted; the budget has let calls go at
        # up to its pace since, so that much of it may be gone already.
        next_charge + math.floor(elapsed_ms * gauge.limit * share / MINUTE_MS),
    )


def _reset_s(gauges: dict[Dimension, Gauge]) -> float | None:
    """After a 429 that names no wait: the latest reset among the exhausted dimensions."""
    resets = [g.reset_s for g in gauges.values() if g.remaining == 0 and g.reset_s is not None]
    return max(resets) if resets else None


def _averages(per_char: Any, completion: Any) -> Averages:
    def number(value: Any) -> float | None:
        try:
            return float(value) if value is not None else None
        except (TypeError, ValueError):
            return None

    seen = number(per_char)
    return Averages(seen if seen else Averages().per_char, number(completion))
