"""A key's spend cap per quota window, in currency: reserved at submit, settled with the cost.

The token quota's design (`quota.py`), counted in millionths of the currency instead of tokens:
a submit reserves the most its job may cost (its `quota_bound` tokens at the model's price,
rounded up) if that fits under the cap, atomically in one Lua script, so concurrent submits on
every API process together never reserve past the cap; the worker then replaces the
reservation by the job's real cost (0 for a job that ends without a result). The bound, as for
tokens: a key's spend never exceeds its cap while providers report no more tokens than the
bound reserved. A model with no price costs nothing and reserves nothing.
"""

from __future__ import annotations

import math
import time

from redis.asyncio import Redis

from flow_api.auth.principal import Principal
from flow_api.auth.quota import RESERVE_SCRIPT, SETTLE_SCRIPT
from flow_api.errors import SpendCapReached
from flow_api.jobs import Charge
from flow_api.keys import spend_jobs_key, spend_key
from flow_api.queue.connection import redis_errors_as_unavailable

MICROS = 1_000_000


class SpendCap:
    """The per-key spend ledger shared by API processes (reserve) and workers (settle)."""

    def __init__(self, redis: Redis, queue_name: str, window_s: int, currency: str) -> None:
        self.queue_name = queue_name
        self.window_s = window_s
        self.currency = currency
        self._reserve = redis.register_script(RESERVE_SCRIPT)
        self._settle = redis.register_script(SETTLE_SCRIPT)

    async def reserve(self, principal: Principal, micros: int, job_id: str) -> Charge | None:
        """Reserve `micros` of the key's cap for job `job_id`, or raise `SpendCapReached`.
        None when the key has no cap or the job costs nothing: nothing to settle later."""
        cap = math.floor(principal.spend_per_day * MICROS)
        if principal.key_id is None or cap <= 0 or micros <= 0:
            return None
        now = time.time()
        window = int(now // self.window_s)
        charge = Charge(key_id=principal.key_id, window=window, tokens=micros)
        keys = [spend_key(self.queue_name, charge.key_id, window)]
        keys.append(spend_jobs_key(self.queue_name, charge.key_id, window))
        with redis_errors_as_unavailable():
            admitted, used = await self._reserve(
                keys=keys, args=[cap, micros, 2 * self.window_s, job_id]
            )
        if admitted:
            return charge
        raise SpendCapReached(
            f"the key's spend cap is reached ({used / MICROS:.6f} of "
            f"{principal.spend_per_day:g} {self.currency} in this {self.window_s} s window; "
            f"this request may cost up to {micros / MICROS:.6f})",
            retry_after=(window + 1) * self.window_s - now,
        )

    async def settle(self, charge: Charge, micros: int, job_id: str) -> None:
        """Replace job `job_id`'s reservation by its real cost (0 refunds it)."""
        keys = [spend_key(self.queue_name, charge.key_id, charge.window)]
        keys.append(spend_jobs_key(self.queue_name, charge.key_id, charge.window))
        with redis_errors_as_unavailable():
            await self._settle(keys=keys, args=[job_id, micros])
