"""Queue depth by state, read from BullMQ's own keys in one round trip (for `GET /metrics`).

Each state is one list or sorted set, so its length is O(1) to read: a scrape costs the same
with ten jobs or ten million. Jobs held back by fair share (`fair_share.py`) are waiting too,
from a client's point of view: they are counted under `waiting`.
"""

from __future__ import annotations

from redis.asyncio import Redis

from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.settings import RedisSettings

LISTS = {"wait": "waiting", "paused": "waiting", "active": "active", "fair:waiting": "waiting"}
SORTED_SETS = {
    "prioritized": "waiting",
    "delayed": "delayed",
    "completed": "completed",
    "failed": "failed",
}
STATES = ("waiting", "delayed", "active", "completed", "failed")


async def queue_depth(redis: Redis, settings: RedisSettings) -> dict[str, int]:
    """Jobs in each state of `STATES` now (`completed` and `failed` are those still kept)."""
    base = f"{settings.prefix}:{settings.queue_name}"
    depth = dict.fromkeys(STATES, 0)
    with redis_errors_as_unavailable():
        async with redis.pipeline(transaction=False) as pipe:
            for key in LISTS:
                pipe.llen(f"{base}:{key}")
            for key in SORTED_SETS:
                pipe.zcard(f"{base}:{key}")
            counts = await pipe.execute()
    for state, count in zip([*LISTS.values(), *SORTED_SETS.values()], counts, strict=True):
        depth[state] += int(count)
    return depth
