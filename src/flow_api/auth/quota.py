"""Tokens per key per day: reserved at submit as an upper bound, settled with the real usage.

The reservation is `jobs.quota_bound` (a true upper bound of what the job may spend, see there),
so a settle only ever gives tokens back: the window's counter never goes over the key's limit
while providers report no more than that bound. A job's settle is recorded per job
(`token_jobs_key`): a job settled again (run again after a crash or a lost finish) replaces
its earlier settle instead of adding to it.

Why a small Lua script and not the `limits` library here: a quota needs "refuse without
counting when the estimate does not fit" and a later correction by (actual - estimate) in the
same window, which no rate-limit strategy offers. Windows are aligned to the epoch (UTC
midnight for the default day); a counter lives two windows.
"""

from __future__ import annotations

import time

from redis.asyncio import Redis

from flow_api.auth.principal import Principal
from flow_api.errors import QuotaExhausted
from flow_api.jobs import Charge
from flow_api.keys import token_jobs_key, token_quota_key
from flow_api.queue.connection import redis_errors_as_unavailable

# Reserve ARGV[2] tokens for job ARGV[4] if they fit under the limit ARGV[1]; returns {admitted,
# used}. Once per job: a reserve sent again (a client retrying after a lost reply) finds the
# job's entry and counts nothing more. KEYS: the window's counter, its jobs hash. ARGV[3]: TTL.
_RESERVE = """
local used = tonumber(redis.call("GET", KEYS[1]) or "0")
if redis.call("HEXISTS", KEYS[2], ARGV[4]) == 1 then return {1, used} end
local cost = tonumber(ARGV[2])
if used + cost > tonumber(ARGV[1]) then return {0, used} end
redis.call("INCRBY", KEYS[1], cost)
redis.call("EXPIRE", KEYS[1], ARGV[3])
redis.call("HSET", KEYS[2], ARGV[4], cost)
redis.call("EXPIRE", KEYS[2], ARGV[3])
return {1, used + cost}
"""

# Settle job ARGV[1] at ARGV[2] tokens: add the difference from what its entry holds (its
# reservation, or its last settle), never below zero. A job with no entry reserved nothing here
# (its reservation never happened, or its window is gone): nothing to do.
# KEYS: the window's counter, its jobs hash.
_SETTLE = """
local before = redis.call("HGET", KEYS[2], ARGV[1])
if not before or redis.call("EXISTS", KEYS[1]) == 0 then return 0 end
local delta = tonumber(ARGV[2]) - tonumber(before)
redis.call("HSET", KEYS[2], ARGV[1], ARGV[2])
if redis.call("INCRBY", KEYS[1], delta) < 0 then redis.call("SET", KEYS[1], 0, "KEEPTTL") end
return 1
"""


RESERVE_SCRIPT = _RESERVE
SETTLE_SCRIPT = _SETTLE
"""The scripts, for ledgers of other units kept the same way (`spend.py`)."""


class TokenQuota:
    """The per-key token ledger shared by API processes (reserve) and workers (settle)."""

    def __init__(self, redis: Redis, queue_name: str, window_s: int) -> None:
        self.queue_name = queue_name
        self.window_s = window_s
        self._reserve = redis.register_script(_RESERVE)
        self._settle = redis.register_script(_SETTLE)

    def charge_for(self, principal: Principal, tokens: int, completion: int | None) -> Charge:
        """The reservation `tokens` would be in the key's current window."""
        assert principal.key_id is not None
        window = int(time.time() // self.window_s)
        return Charge(key_id=principal.key_id, window=window, tokens=tokens, completion=completion)

    async def reserve(
        self, principal: Principal, tokens: int, job_id: str, completion: int | None = None
    ) -> Charge | None:
        """Reserve `tokens` of the key's quota for job `job_id`, or raise `QuotaExhausted`.
        None when the key has no quota (or auth is off): nothing to settle later.
        `completion`: the completion tokens included, which the worker holds the call to."""
        limit = principal.tokens_per_day
        if principal.key_id is None or limit <= 0:
            return None
        now = time.time()
        charge = self.charge_for(principal, tokens, completion)
        key = token_quota_key(self.queue_name, charge.key_id, charge.window)
        jobs = token_jobs_key(self.queue_name, charge.key_id, charge.window)
        with redis_errors_as_unavailable():
            admitted, used = await self._reserve(
                keys=[key, jobs], args=[limit, tokens, 2 * self.window_s, job_id]
            )
        window = charge.window
        if admitted:
            return charge
        if tokens > limit:
            message = (
                f"this request may use up to {tokens} tokens, more than the key's whole quota "
                f"of {limit}; lower options.maxTokens or shorten the prompt"
            )
        else:
            message = (
                f"the key's token quota is spent ({used} of {limit} in this "
                f"{self.window_s} s window; this request needs up to {tokens})"
            )
        raise QuotaExhausted(message, retry_after=(window + 1) * self.window_s - now)

    async def settle(self, charge: Charge, used: int, job_id: str) -> None:
        """Replace job `job_id`'s reservation by the tokens it really used (0 refunds it).
        Settling a job again replaces its earlier settle: nothing is counted twice."""
        key = token_quota_key(self.queue_name, charge.key_id, charge.window)
        jobs = token_jobs_key(self.queue_name, charge.key_id, charge.window)
        with redis_errors_as_unavailable():
            await self._settle(keys=[key, jobs], args=[job_id, used])
