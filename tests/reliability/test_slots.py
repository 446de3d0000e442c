"""A client's cancel never costs a worker slot, wherever it lands (issue 12, defect 1).

Real processes: the API in this process, a `flow-api worker` child with 2 slots, real Valkey,
the OpenAI simulator. Before the fix, one cancel during a rate-budget wait left the worker with
one slot (jobs ran one at a time, silently) and a second stopped it with exit code 0.
"""

from __future__ import annotations

import asyncio
import random

from flow_api.embedded import EmbeddedValkey
from flow_api.heartbeat import Heartbeat, read_heartbeats
from flow_api.queue.connection import connect
from flow_api.settings import BudgetLimit, BudgetSettings, Settings, WorkerSettings
from flow_api.testing import Simulator
from tests.support import Api, cloud_settings, serving
from tests.support.processes import astop, env_for, flow_api

SLOTS = 2


def slot_settings(valkey: EmbeddedValkey, sim: Simulator, budget: BudgetSettings) -> Settings:
    worker = WorkerSettings(concurrency=SLOTS, job_timeout_s=10, backoff_base_ms=50)
    return cloud_settings(valkey.url, sim.url, worker=worker, budget=budget)


async def all_slots_live(settings: Settings, timeout_s: float = 30) -> Heartbeat:
    """The single worker's heartbeat, once it reports every slot live."""
    redis = connect(settings.redis)
    beats: list[Heartbeat] = []
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while not (beats and beats[0].live_slots == SLOTS):
            assert asyncio.get_running_loop().time() < deadline, f"heartbeats: {beats}"
            await asyncio.sleep(0.1)
            beats = await read_heartbeats(redis, settings.redis.queue_name)
            assert len(beats) <= 1, beats
        return beats[0]
    finally:
        await redis.aclose()


async def cancel_later(api: Api, job_id: str, delay_s: float) -> int:
    await asyncio.sleep(delay_s)
    answer = await api.client.post(f"/api/ai/jobs/{job_id}/cancel")
    return answer.status_code


async def check_serving(api: Api, settings: Settings) -> None:
    """The worker reports every slot live, and still completes jobs."""
    await all_slots_live(settings)
    ids = [await api.submit(f"after the cancels {i}") for i in range(4)]
    for job_id in ids:
        assert (await api.wait(job_id, timeout_s=60))["status"] == "completed"
    await all_slots_live(settings)


async def run_and_cancel(settings: Settings, plan: list[float]) -> tuple[list[int], str]:
    """Submit one job per entry of `plan`, cancel each that many seconds later, then check the
    worker still serves with every slot; returns the cancel answers and the worker's output."""
    async with serving(settings) as api:
        worker = flow_api("worker", env=env_for(settings))
        try:
            await all_slots_live(settings)
            ids = [await api.submit(f"to cancel {i}") for i in range(len(plan))]
            answers = await asyncio.gather(
                *(cancel_later(api, job_id, delay) for job_id, delay in zip(ids, plan, strict=True))
            )
            finals = [await api.wait(job_id, timeout_s=60) for job_id in ids]
            outcomes = [(f["status"], f.get("error", {}).get("message")) for f in finals]
            assert {f["status"] for f in finals} <= {"cancelled", "completed"}, outcomes
            assert worker.poll() is None, "the worker stopped"
            await check_serving(api, settings)
        finally:
            code, output = await astop(worker)
    assert code == 0, output
    return list(answers), output


async def test_cancels_during_a_budget_wait_keep_every_slot(
    valkey: EmbeddedValkey, simulator: Simulator
) -> None:
    # One call each 2 s, and waits of up to 10 s slept in the slot: of three jobs, the first
    # runs at once and the other two wait in the slots for their budget — where each gets
    # cancelled (the path that ended a slot per cancel before).
    budget = BudgetSettings(
        limits={"openai/*": BudgetLimit(rpm=30)}, inline_wait_ms=10_000, horizon_ms=10_000
    )
    settings = slot_settings(valkey, simulator, budget)
    async with serving(settings) as api:
        worker = flow_api("worker", env=env_for(settings))
        try:
            await all_slots_live(settings)
            first, *waiting = [await api.submit(f"budget wait {i}") for i in range(3)]
            assert (await api.wait(first))["status"] == "completed"
            for job_id in waiting:
                await wait_for_status(api, job_id, "active")  # taken, sleeping for its budget
            for job_id in waiting:
                answer = await api.client.post(f"/api/ai/jobs/{job_id}/cancel")
                assert answer.status_code == 200, answer.text
            for job_id in waiting:
                assert (await api.wait(job_id))["status"] == "cancelled"
            assert worker.poll() is None, "the worker stopped"
            await check_serving(api, settings)
        finally:
            code, output = await astop(worker)
    assert code == 0, output
    assert "slot ended unexpectedly" not in output, output


async def wait_for_status(api: Api, job_id: str, status: str, timeout_s: float = 20) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    while (await api.client.get(f"/api/ai/status/{job_id}")).json()["status"] != status:
        assert asyncio.get_running_loop().time() < deadline, f"{job_id} never {status}"
        await asyncio.sleep(0.02)


async def test_cancels_at_random_moments_keep_every_slot(
    valkey: EmbeddedValkey, simulator: Simulator
) -> None:
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    simulator.config.latency_s = 0.15
    budget = BudgetSettings(limits={"openai/*": BudgetLimit(rpm=600)}, inline_wait_ms=200)
    settings = slot_settings(valkey, simulator, budget)
    plan = [rng.uniform(0, 0.5) for _ in range(24)]
    _, output = await run_and_cancel(settings, plan)
    assert "slot ended unexpectedly" not in output, (seed, output)
