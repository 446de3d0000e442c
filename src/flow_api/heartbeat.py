"""Worker heartbeats: each worker process's live slot count, in Redis, for anyone to read.

A worker writes its record every `INTERVAL_S` (and at once when its live slots change) under
`keys.worker_heartbeat_key`, expiring after `TTL_S`: a worker that died or hung disappears.
`flow-api check` and the tests read them with `read_heartbeats`.
"""

from __future__ import annotations

import orjson
from pydantic import BaseModel, ConfigDict
from redis.asyncio import Redis

from flow_api.keys import worker_heartbeat_key, worker_heartbeat_pattern

INTERVAL_S = 2.0
TTL_S = 10


class Heartbeat(BaseModel):
    """One worker process, as it last reported itself."""

    model_config = ConfigDict(frozen=True)

    worker: str
    pid: int
    slots: int
    """Configured concurrency."""
    live_slots: int
    """Slot tasks running now: `slots` unless some ended and are being replaced."""
    in_flight: int
    at_ms: int

    @property
    def healthy(self) -> bool:
        return self.live_slots == self.slots


async def write_heartbeat(redis: Redis, queue_name: str, beat: Heartbeat) -> None:
    key = worker_heartbeat_key(queue_name, beat.worker)
    await redis.set(key, orjson.dumps(beat.model_dump()), ex=TTL_S)


async def read_heartbeats(redis: Redis, queue_name: str) -> list[Heartbeat]:
    """Every worker of the queue that reported within `TTL_S`, by worker name."""
    keys = [key async for key in redis.scan_iter(match=worker_heartbeat_pattern(queue_name))]
    values = await redis.mget(keys) if keys else []
    beats = [Heartbeat.model_validate(orjson.loads(v)) for v in values if v is not None]
    return sorted(beats, key=lambda b: b.worker)
