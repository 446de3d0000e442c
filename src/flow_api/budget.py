"""Provider rate limits (requests and tokens per minute) shared by every worker through Redis.

Each provider/model has one small Redis hash holding two *theoretical arrival times* (GCRA,
the generic cell rate algorithm): `rt`, the earliest time the next request may start, and `tt`,
the same for tokens. A call starting at `s` moves `rt` to `s + 60 s / rpm` and `tt` to
`s + tokens * 60 s / tpm` (each limit scaled down by `FLOW_BUDGET_HEADROOM`). So calls are
spaced evenly at the limit, never bunched: a provider counting a sliding minute (as OpenAI's and
the simulator's limiters do) sees at most the limit in any minute, from every worker together.

Tokens are reserved before the call from an estimate (prompt and system characters at the
model's tokens per character — 1/4 until its answers' usage teaches each worker better — plus
`maxTokens`, or `FLOW_BUDGET_COMPLETION_TOKENS` when the request sets none) and reconciled after
it: the estimate is replaced by the real prompt tokens plus `maxTokens` when set (OpenAI's
limiter counts the whole `max_tokens` a request asks for), or plus the real completion when not.

A call that cannot start now is not refused: the script hands the job the next free start time
and *reserves* it (`…:r:<jobId>`, with a TTL). The worker puts the job back in BullMQ's delayed
set until then (`JobHandle.defer`: no attempt spent, no slot held) and the job, when it comes
back, starts on its reservation. Deferred jobs thus come back one by one at the limit's pace
instead of all at once to be turned away again. Waits shorter than `FLOW_BUDGET_INLINE_WAIT_MS`
are slept in the slot instead. Places are reserved at most `FLOW_BUDGET_HORIZON_MS` ahead: a
whole backlog scheduled at once would be priced with the first, rough estimates for good; jobs
further back are told when to come back (spaced a little tighter than the budget, `pt`) and
reserve then, at the estimates of that time.

A 429 sets a cooldown on the model (`cool`: its `Retry-After`, else `FLOW_BUDGET_COOLDOWN_S`)
that every worker's next reservation waits for, and the job is put back without spending an
attempt (after `FLOW_BUDGET_MAX_DEFERRALS` put-backs a 429 is retried like other errors again).

Limits come from `FLOW_BUDGET_LIMITS` (`provider/model`, or `provider/*` for every model) and,
for models with none configured, from the provider's `x-ratelimit-limit-requests/-tokens`
headers (OpenAI and Azure; see `providers/openai_inline.py`), learned by each worker from its own
answers. A worker consults Redis for a model only once it knows a limit for it or has had a 429
from it, so unlimited models cost no round trip.

Why hand-written Lua rather than a limiter library (the `limits` package serves per-key API
rate limits in `auth/rate.py`): a limiter answers "may I, now?", while a queue needs "when may
I?" with that time reserved for the asker, a variable cost in tokens, and a correction of that
cost after the call. None of the `limits` strategies (fixed, moving or sliding window) reserve
a future slot or take a cost back; GCRA does all three with two numbers per model.
"""

from __future__ import annotations

import asyncio
import logging
import math
import time
from dataclasses import dataclass
from types import TracebackType
from typing import Any

from redis.asyncio import Redis

from flow_api.errors import FlowError, ProviderRateLimited
from flow_api.jobs import CHARS_PER_TOKEN, estimate_tokens, now_ms, prompt_chars
from flow_api.keys import budget_key, budget_reservation_key
from flow_api.models import GenerateRequest, Generation
from flow_api.providers.openai_inline import RATELIMIT_FIELD
from flow_api.queue.connection import connect, redis_errors_as_unavailable
from flow_api.queue.consumer import JobHandle
from flow_api.settings import BudgetLimit, BudgetSettings, Settings

log = logging.getLogger(__name__)

MINUTE_MS = 60_000
KEEP_MS = 120_000  # budget keys outlive their last reservation by this much

# KEYS: budget hash, this job's reservation.
# ARGV: now, rpm, tpm, tokens, share, inline, keep, horizon.
# Returns {go, start_ms}: go=1 start at start_ms (sleep until then); go=0 wait until start_ms.
_ACQUIRE = """
local now, rpm, tpm = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local tokens, share = tonumber(ARGV[4]), tonumber(ARGV[5])
local inline, keep, horizon = tonumber(ARGV[6]), tonumber(ARGV[7]), tonumber(ARGV[8])
local state = redis.call("HMGET", KEYS[1], "rt", "tt", "cool", "pt")
local rt, tt, cool = tonumber(state[1]) or 0, tonumber(state[2]) or 0, tonumber(state[3]) or 0
local reserved = tonumber(redis.call("GET", KEYS[2]) or "")
if reserved then
  if now >= cool and now + inline >= reserved then
    redis.call("DEL", KEYS[2])
    return {1, math.floor(reserved)}
  end
  if now >= cool then return {0, math.floor(reserved)} end
  redis.call("DEL", KEYS[2])  -- its slot fell inside a cooldown: take a fresh one
end
local start = math.max(now, cool, rt, tt)
local ri, ti = 0, 0
if rpm > 0 then ri = MINUTE / (rpm * share) end
if tpm > 0 then ti = tokens * MINUTE / (tpm * share) end
if start - now > horizon then
  -- Too far ahead to hold a place (it would be priced with today's estimate): come back about
  -- half a horizon before it, spaced a little tighter than the budget, and reserve then.
  local wake = math.max(tonumber(state[4]) or 0, start - horizon / 2)
  redis.call("HSET", KEYS[1], "pt", wake + 0.75 * math.max(ri, ti))
  redis.call("PEXPIRE", KEYS[1], math.ceil(math.max(rt, tt, cool, wake) - now + keep))
  return {0, math.floor(wake)}
end
if rpm > 0 then rt = start + ri end
if tpm > 0 then tt = start + ti end
redis.call("HSET", KEYS[1], "rt", rt, "tt", tt)
redis.call("PEXPIRE", KEYS[1], math.ceil(math.max(rt, tt, cool) - now + keep))
if start - now <= inline then return {1, math.floor(start)} end
redis.call("SET", KEYS[2], start, "PX", math.ceil(start - now + keep))
return {0, math.floor(start)}
""".replace("MINUTE", str(MINUTE_MS))

# KEYS: budget hash. ARGV: now, token correction (may be negative), tpm, share.
# Unused tokens are given back, but never into the past (an idle minute is not banked).
_SETTLE = """
if redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
local now, delta = tonumber(ARGV[1]), tonumber(ARGV[2])
local tpm, share = tonumber(ARGV[3]), tonumber(ARGV[4])
local tt = tonumber(redis.call("HGET", KEYS[1], "tt") or "0")
if delta > 0 then tt = math.max(tt, now) end
tt = math.max(tt + delta * MINUTE / (tpm * share), now)
redis.call("HSET", KEYS[1], "tt", tt)
return 1
""".replace("MINUTE", str(MINUTE_MS))

# KEYS: budget hash. ARGV: now, cooldown end, keep.
_COOL = """
local cool = math.max(tonumber(redis.call("HGET", KEYS[1], "cool") or "0"), tonumber(ARGV[2]))
redis.call("HSET", KEYS[1], "cool", cool)
redis.call("PEXPIRE", KEYS[1], math.ceil(cool - tonumber(ARGV[1]) + tonumber(ARGV[3])))
return math.floor(cool)
"""


@dataclass(frozen=True, slots=True)
class Limits:
    rpm: int = 0  # 0: none
    tpm: int = 0

    @property
    def any(self) -> bool:
        return bool(self.rpm or self.tpm)


@dataclass(slots=True)
class Ticket:
    """One admitted call: what it reserved, to be settled after it."""

    provider: str
    model: str
    tokens: int  # the estimate reserved
    chars: int  # prompt and system characters, to learn tokens per character
    max_tokens: int | None  # the request's own maxTokens, charged in full
    limits: Limits
    checked: bool  # whether Redis was consulted (else nothing to settle)

    def observe(self, metadata: dict[str, Any]) -> None:
        """Hook for the pipeline: the model message's `response_metadata` (headers land here)."""
        self.headers = metadata.get(RATELIMIT_FIELD)

    headers: dict[str, str] | None = None


class RateBudget:
    """The workers' side of the shared rate budgets. No connection until entered; entered with
    `redis` (the worker process's pool), it uses that one and leaves it open."""

    def __init__(self, settings: Settings, redis: Redis | None = None) -> None:
        self.settings: BudgetSettings = settings.budget
        self.queue_name = settings.redis.queue_name
        self._redis_settings = settings.redis
        self._pool = redis
        self._redis: Redis | None = None
        self._learned: dict[tuple[str, str], Limits] = {}
        self._throttled_until: dict[tuple[str, str], float] = {}
        self._scripts: dict[str, Any] = {}
        # Prompt tokens per character, learned per model from the answers' usage: the first
        # estimates assume 4 characters a token, later ones what the provider really counted.
        self._per_char: dict[tuple[str, str], float] = {}

    async def __aenter__(self) -> RateBudget:
        self._redis = self._pool or connect(self._redis_settings)
        for name, text in (("acquire", _ACQUIRE), ("settle", _SETTLE), ("cool", _COOL)):
            self._scripts[name] = self._redis.register_script(text)
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        redis, self._redis = self._redis, None
        if redis is not None and redis is not self._pool:
            await redis.aclose()

    # --- limits ---------------------------------------------------------------------------

    def limits_for(self, provider: str, model: str) -> Limits:
        """Configured limits (`provider/model`, else `provider/*`), else learned ones."""
        configured = self.settings.limits
        limit: BudgetLimit | None = configured.get(f"{provider}/{model}") or configured.get(
            f"{provider}/*"
        )
        if limit is not None:
            return Limits(limit.rpm or 0, limit.tpm or 0)
        return self._learned.get((provider, model), Limits())

    def _learn(self, ticket: Ticket) -> None:
        headers = ticket.headers
        if not headers or not self.settings.learn_from_headers:
            return
        key = f"{ticket.provider}/{ticket.model}"
        if key in self.settings.limits or f"{ticket.provider}/*" in self.settings.limits:
            return
        learned = Limits(
            _int(headers.get("x-ratelimit-limit-requests")),
            _int(headers.get("x-ratelimit-limit-tokens")),
        )
        if learned.any and self._learned.get((ticket.provider, ticket.model)) != learned:
            log.info("learned %s limits from its headers: %s", key, learned)
            self._learned[(ticket.provider, ticket.model)] = learned

    def estimate(self, provider: str, model: str, request: GenerateRequest) -> int:
        """Tokens a request may use: its prompt and system text at the model's learned tokens
        per character (1/4 until answers say), plus `maxTokens` or the configured default."""
        per_char = self._per_char.get((provider, model), 1 / CHARS_PER_TOKEN)
        return estimate_tokens(request, self.settings.completion_tokens, per_char)

    def _learn_tokens(self, ticket: Ticket, prompt_tokens: int) -> None:
        if ticket.chars <= 0 or prompt_tokens <= 0:
            return
        key = (ticket.provider, ticket.model)
        seen = prompt_tokens / ticket.chars
        known = self._per_char.get(key)
        self._per_char[key] = seen if known is None else known + 0.2 * (seen - known)

    def _consult(self, provider: str, model: str, limits: Limits) -> bool:
        if not self.settings.enabled or self._redis is None:
            return False
        if limits.any:
            return True
        until = self._throttled_until.get((provider, model))
        return until is not None and until > time.monotonic()

    # --- the three moments of a call ------------------------------------------------------

    async def admit(
        self, job: JobHandle, provider: str, model: str, request: GenerateRequest
    ) -> Ticket:
        """Reserve this call's place in the model's budget. Returns at (or just before) the
        reserved start; when that is further off, puts the job back until then (raises
        `JobDeferred` through `job.defer`)."""
        limits = self.limits_for(provider, model)
        tokens = self.estimate(provider, model, request)
        consult = self._consult(provider, model, limits)
        chars = prompt_chars(request)
        ticket = Ticket(provider, model, tokens, chars, request.options.max_tokens, limits, consult)
        if not consult:
            return ticket
        assert self._redis is not None
        now = now_ms()
        with redis_errors_as_unavailable():
            go, start = await self._scripts["acquire"](
                keys=[
                    budget_key(self.queue_name, provider, model),
                    budget_reservation_key(self.queue_name, provider, model, job.id),
                ],
                args=[
                    now,
                    limits.rpm,
                    limits.tpm,
                    tokens,
                    1 - self.settings.headroom,
                    self.settings.inline_wait_ms,
                    KEEP_MS,
                    self.settings.horizon_ms,
                ],
            )
        if go:
            wait = (int(start) - now_ms()) / 1000
            if wait > 0:
                await asyncio.sleep(wait)
            return ticket
        if await job.cancel_requested():
            return ticket  # let the attempt start and end as cancelled, without a call
        log.debug("job %s waits %d ms for %s/%s budget", job.id, int(start) - now, provider, model)
        await job.defer(int(start))

    async def settle(self, ticket: Ticket, generation: Generation) -> None:
        """Correct the reserved tokens with the real usage; learn limits from the headers."""
        self._learn(ticket)
        if not ticket.checked or not ticket.limits.tpm or self._redis is None:
            return
        usage = generation.usage
        if usage.total_tokens <= 0:
            return  # the provider reported nothing: the estimate stands
        self._learn_tokens(ticket, usage.prompt_tokens)
        completion = ticket.max_tokens or usage.completion_tokens
        delta = usage.prompt_tokens + completion - ticket.tokens
        if delta == 0:
            return
        key = budget_key(self.queue_name, ticket.provider, ticket.model)
        try:
            with redis_errors_as_unavailable():
                await self._scripts["settle"](
                    keys=[key],
                    args=[now_ms(), delta, ticket.limits.tpm, 1 - self.settings.headroom],
                )
        except FlowError as exc:  # the job's outcome matters more than the ledger
            log.warning("budget of %s/%s not corrected: %s", ticket.provider, ticket.model, exc)

    async def rate_limited(
        self, job: JobHandle, ticket: Ticket, error: ProviderRateLimited
    ) -> None:
        """After a 429: cool the model down for every worker and put the job back without
        spending an attempt (raises `JobDeferred`); returns when the job has been put back
        too often, so that the caller fails the attempt as usual."""
        if not self.settings.enabled or self._redis is None:
            return
        wait_s = error.retry_after if error.retry_after else self.settings.cooldown_s
        key = (ticket.provider, ticket.model)
        self._throttled_until[key] = time.monotonic() + wait_s + KEEP_MS / 1000
        now = now_ms()
        with redis_errors_as_unavailable():
            until = await self._scripts["cool"](
                keys=[budget_key(self.queue_name, ticket.provider, ticket.model)],
                args=[now, now + math.ceil(wait_s * 1000), KEEP_MS],
            )
        if job.starts - job.attempt >= self.settings.max_deferrals:
            return
        await job.defer(int(until))


def _int(value: str | None) -> int:
    try:
        return max(int(value or 0), 0)
    except ValueError:
        return 0
