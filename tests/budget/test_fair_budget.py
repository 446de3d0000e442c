"""A tenant's backlog waiting for a model's rate budget does not push another tenant's jobs
behind it: each tenant has its own line of come-back times. Real Valkey, a real worker."""

from __future__ import annotations

import asyncio
import itertools
from collections.abc import Awaitable, Callable

from flow_api.embedded import EmbeddedValkey
from flow_api.jobs import JobData
from flow_api.models import GenerateRequest
from flow_api.queue.connection import connect
from flow_api.queue.producer import JobQueue
from flow_api.settings import BudgetLimit
from tests.budget.conftest import budget_settings
from tests.support import WorkerFactory


async def until(read: Callable[[], Awaitable[int]], value: int, timeout_s: float) -> None:
    """Poll `read()` until it returns `value`."""
    async with asyncio.timeout(timeout_s):
        for _ in itertools.count():
            if await read() == value:
                return
            await asyncio.sleep(0.05)


def job(tenant: str, i: int) -> JobData:
    request = GenerateRequest(prompt=f"{tenant} {i}")
    return JobData.submitted(request, provider="fake", model="fake", tenant=tenant)


async def test_a_backlog_waiting_for_budget_does_not_starve_another_tenant(
    valkey: EmbeddedValkey, start_worker: WorkerFactory
) -> None:
    # 1200 calls a minute: the worker's slots take A's whole backlog at once; a budget horizon
    # (3 s) holds 60 reserved starts, the rest of the backlog is told to come back later.
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(rpm=1200)})
    redis = connect(settings.redis)
    completed = f"{settings.redis.prefix}:{settings.redis.queue_name}:completed"
    try:
        queue = JobQueue(redis, settings.redis, settings.worker)
        await queue.enqueue_many([job("a", i) for i in range(150)])
        await start_worker(settings)
        line = f"{settings.redis.prefix}:{settings.redis.queue_name}:fair:t:a"
        await until(lambda: redis.exists(line), 0, 30)  # every job of A's was taken once
        b_ids = await queue.enqueue_many([job("b", i) for i in range(3)])
        await until(lambda: redis.zcard(completed), 153, 60)
        order = await redis.zrange(completed, 0, -1)
    finally:
        await redis.aclose()
    b_positions = sorted(order.index(job_id) for job_id in b_ids)
    # In one shared line of come-back times B's jobs would finish behind A's whole backlog
    # (150-152). In its own line, B's first job reserves the next free start (one budget
    # horizon, 60 calls, ahead) and the others come back beside A's returning jobs.
    assert b_positions[-1] < 130, b_positions
