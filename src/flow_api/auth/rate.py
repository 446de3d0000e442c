"""Submits per key per window, counted in Redis so every API process shares one budget.

The window math is the `limits` library's moving window (its own atomic Lua scripts), on the
API's Redis pool; its keys expire one window after the last request.
"""

from __future__ import annotations

import time

from limits import RateLimitItemPerSecond
from limits.aio.storage import RedisStorage
from limits.aio.strategies import MovingWindowRateLimiter
from redis.asyncio import Redis

from flow_api.auth.principal import Principal
from flow_api.errors import RateLimited
from flow_api.keys import rate_limit_prefix
from flow_api.queue.connection import redis_errors_as_unavailable


class SubmitRateLimiter:
    """At most `principal.requests_per_minute` submits per key in any `window_s` seconds."""

    def __init__(self, redis: Redis, queue_name: str, window_s: int) -> None:
        self.window_s = window_s
        storage = RedisStorage(
            "async+redis://",  # unused: the storage talks through our pool
            implementation="redispy",
            key_prefix=rate_limit_prefix(queue_name),
            # Share the API's pool (limits' storage has no close of its own); its option type
            # only lists scalars.
            connection_pool=redis.connection_pool,  # type: ignore[arg-type]
        )
        self._limiter = MovingWindowRateLimiter(storage)

    async def hit(self, principal: Principal) -> None:
        """Count one submit; raise `RateLimited` (with the wait) when the window is full."""
        if principal.key_id is None or principal.requests_per_minute <= 0:
            return
        item = RateLimitItemPerSecond(principal.requests_per_minute, self.window_s)
        with redis_errors_as_unavailable():
            if await self._limiter.hit(item, "submit", principal.key_id):
                return
            stats = await self._limiter.get_window_stats(item, "submit", principal.key_id)
        raise RateLimited(
            f"this key may submit {principal.requests_per_minute} requests per "
            f"{self.window_s} s; try again later",
            retry_after=max(stats.reset_time - time.time(), 1.0),
        )
