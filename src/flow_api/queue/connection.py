"""The Redis client every part of the service uses, and Redis-down errors mapped at the boundary."""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from redis import exceptions as redis_errors
from redis.asyncio import Redis
from redis.asyncio.retry import Retry
from redis.backoff import ExponentialBackoff

from flow_api.errors import FlowError, QueueFull, QueueUnavailable
from flow_api.settings import RedisSettings

REDIS_DOWN: tuple[type[BaseException], ...] = (
    redis_errors.ConnectionError,
    redis_errors.TimeoutError,
    redis_errors.BusyLoadingError,
    redis_errors.ReadOnlyError,  # a replica, for a failover's few seconds
    ConnectionError,
    OSError,
)
"""What a lost, restarting, failing-over or unreachable Redis raises."""

RedisOutOfMemory = redis_errors.OutOfMemoryError
"""What a Redis at its `maxmemory` (policy `noeviction`) answers to a write."""

REDIS_TROUBLE: tuple[type[BaseException], ...] = (*REDIS_DOWN, RedisOutOfMemory)
"""Redis errors that pass by themselves (a restart, memory freed): retried, never a job's fault."""

OUT_OF_MEMORY_RETRY_S = 5


def out_of_memory() -> QueueFull:
    """The `QueueFull` a write refused for memory stands for."""
    return QueueFull(
        "the job store is out of memory; try again once workers have drained some jobs",
        reason="redis_out_of_memory",
        retry_after=OUT_OF_MEMORY_RETRY_S,
    )


def connect(settings: RedisSettings, *, decode: bool = True) -> Redis:
    """A pooled Redis client with short timeouts, so a missing server answers fast.
    `decode=False` answers bytes (stored files, whose pieces may split a UTF-8 character)."""
    return Redis.from_url(
        settings.url,
        decode_responses=decode,
        socket_timeout=settings.socket_timeout_s,
        socket_connect_timeout=settings.socket_timeout_s,
        health_check_interval=30,
        retry=Retry(ExponentialBackoff(cap=0.5, base=0.05), 2),
    )


@contextlib.contextmanager
def redis_errors_as_unavailable() -> Iterator[None]:
    """Turn a lost Redis connection into `QueueUnavailable`, and a write refused for memory into
    `QueueFull` (both HTTP 503), at the boundary."""
    try:
        yield
    except FlowError:
        raise
    except RedisOutOfMemory as exc:
        raise out_of_memory() from exc
    except REDIS_DOWN as exc:
        raise QueueUnavailable(f"the job store is unreachable: {type(exc).__name__}") from exc
