"""Fair share between tenants: jobs wait in per-tenant lines that workers take in weighted
round-robin. Real Valkey; the take order is read from what a one-slot worker runs."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest
from redis.asyncio import Redis

from flow_api.jobs import JobData
from flow_api.models import GenerateOptions, GenerateRequest, JobStatus
from flow_api.queue.admission import read_room
from flow_api.queue.connection import connect
from flow_api.queue.producer import CancelDecision, JobQueue
from flow_api.queue.slot_worker import SlotWorker
from flow_api.queue.store import JobStore
from flow_api.settings import AdmissionSettings, Settings, WorkerSettings
from tests.support import Api, WorkerFactory

Taken = list[tuple[str, str]]
"""(tenant, prompt) of each job, in the order the worker started them."""


def job(tenant: str, prompt: str = "p", priority: int | None = None) -> JobData:
    request = GenerateRequest(prompt=prompt, options=GenerateOptions(priority=priority))
    return JobData.submitted(request, provider="fake", model="fake", tenant=tenant)


@pytest.fixture
async def redis(settings: Settings) -> AsyncIterator[Redis]:
    client = connect(settings.redis)
    yield client
    await client.aclose()


def producer(redis: Redis, settings: Settings, **worker: Any) -> JobQueue:
    return JobQueue(redis, settings.redis, WorkerSettings(**worker))


async def run_until(
    settings: Settings, count: int, on_start: Callable[[Taken], Awaitable[None]] | None = None
) -> Taken:
    """Run a one-slot worker until it has started `count` jobs; the order it started them."""
    taken: Taken = []
    done = asyncio.Event()

    async def process(bull_job: Any, token: str) -> dict[str, Any]:
        data = JobData.parse(bull_job.data)
        taken.append((data.tenant, data.request.prompt))
        if on_start is not None:
            await on_start(taken)
        if len(taken) >= count:
            done.set()
        return {}

    options = {
        "connection": settings.redis.url,
        "prefix": settings.redis.prefix,
        "concurrency": 1,
        "drainDelay": 1,
    }
    worker = SlotWorker(settings.redis.queue_name, process, options)
    running = asyncio.create_task(worker.run())
    try:
        await asyncio.wait_for(done.wait(), 30)
    finally:
        await worker.close()
        await asyncio.wait_for(running, 15)
    return taken


async def test_a_late_tenant_starts_before_the_early_tenants_backlog(
    settings: Settings, redis: Redis
) -> None:
    queue = producer(redis, settings)
    await queue.enqueue_many([job("a", f"a{i}") for i in range(200)])

    async def b_arrives(taken: Taken) -> None:
        if len(taken) == 5:  # tenant a's backlog is running: b submits three jobs
            for i in range(3):
                await queue.enqueue(job("b", f"b{i}"))

    taken = await run_until(settings, 12, b_arrives)
    b_positions = [n for n, (tenant, _) in enumerate(taken) if tenant == "b"]
    # b's jobs alternate with a's from the next take on, not after a's 195 left
    assert b_positions == [5, 7, 9], taken


async def test_one_fifo_line_when_fair_share_is_off(settings: Settings, redis: Redis) -> None:
    queue = producer(redis, settings, fair_share=False)
    await queue.enqueue_many([job("a", f"a{i}") for i in range(50)])
    await queue.enqueue_many([job("b", f"b{i}") for i in range(3)])
    taken = await run_until(settings, 53)
    assert [tenant for tenant, _ in taken] == ["a"] * 50 + ["b"] * 3


async def test_weights_set_the_share_of_takes(settings: Settings, redis: Redis) -> None:
    queue = producer(redis, settings, tenant_weights={"heavy": 3.0})
    await queue.enqueue_many([job("heavy") for _ in range(400)])
    await queue.enqueue_many([job("light") for _ in range(400)])
    taken = await run_until(settings, 200)
    heavy = sum(1 for tenant, _ in taken[:200] if tenant == "heavy")
    assert 148 <= heavy <= 152, heavy  # 3 : 1 over any window, within one round
    # the autoscalers' gauge: one entry per job still held
    gauge = f"{settings.redis.prefix}:{settings.redis.queue_name}:fair:waiting"
    assert await redis.llen(gauge) == 800 - len(taken)


async def test_priorities_hold_within_a_tenant(settings: Settings, redis: Redis) -> None:
    queue = producer(redis, settings)
    for prompt, priority in [("p5", 5), ("p1", 1), ("none", None), ("p3", 3), ("p5b", 5)]:
        await queue.enqueue(job("a", prompt, priority), priority=priority)
    taken = await run_until(settings, 5)
    # BullMQ's order: jobs without a priority first, then lowest number first, then arrival
    assert [prompt for _, prompt in taken] == ["none", "p1", "p3", "p5", "p5b"]


async def test_jobs_queued_before_the_upgrade_still_run_first(
    settings: Settings, redis: Redis
) -> None:
    old = producer(redis, settings, fair_share=False)  # a producer from before fair share
    await old.enqueue_many([job("a", f"old{i}") for i in range(5)])
    await old.enqueue(job("a", "old-prioritized", priority=2), priority=2)
    new = producer(redis, settings)
    await new.enqueue_many([job("b", f"new{i}") for i in range(3)])
    taken = await run_until(settings, 9)
    assert [prompt for _, prompt in taken[:6]] == [f"old{i}" for i in range(5)] + [
        "old-prioritized"
    ]
    assert sorted(prompt for _, prompt in taken[6:]) == ["new0", "new1", "new2"]


async def test_a_held_job_is_found_by_id_alone(settings: Settings, redis: Redis) -> None:
    queue = producer(redis, settings)
    job_id = await queue.enqueue(job("team-x", "held"))
    held = await redis.zrange(
        f"{settings.redis.prefix}:{settings.redis.queue_name}:fair:t:team-x", 0, -1
    )
    assert held == [job_id]  # in its tenant's line, not in BullMQ's wait list
    stored = await JobStore(queue).fetch(job_id)
    assert (stored.state, stored.data.tenant) == (JobStatus.WAITING, "team-x")
    assert await queue.request_cancel(job_id) is CancelDecision.FLAGGED


async def test_status_result_and_cancel_of_tenant_queued_jobs(
    api: Api, start_worker: WorkerFactory
) -> None:
    kept = await api.submit("kept")
    dropped = await api.submit("dropped")
    assert (await api.status(kept))["status"] == "waiting"
    cancel = await api.post(f"/api/ai/jobs/{dropped}/cancel")
    assert cancel.status_code == 200, cancel.text
    await start_worker()
    assert (await api.wait(kept))["status"] == "completed"
    assert (await api.wait(dropped))["status"] == "cancelled"
    result = await api.get(f"/api/ai/result/{kept}")
    assert result.status_code == 200, result.text


async def test_admission_counts_jobs_held_in_tenant_lines(settings: Settings, redis: Redis) -> None:
    queue = producer(redis, settings)
    for tenant in ("team-x", "team-y", "team-x"):
        await queue.enqueue(job(tenant))
    room = await read_room(redis, queue, AdmissionSettings())
    assert room.unfinished_jobs == 3  # held jobs are not in BullMQ's wait list
    refusal = room.refusal(AdmissionSettings(max_unfinished_jobs=3))
    assert refusal is not None and refusal.reason == "max_unfinished_jobs"
