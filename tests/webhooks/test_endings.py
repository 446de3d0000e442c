"""Every ending sends exactly one event, including a cancel racing the job's finish and a worker
killed mid-delivery. Real Valkey, real HTTP, the provider simulator, worker processes."""

from __future__ import annotations

import asyncio
import random
import signal
from collections import Counter
from collections.abc import AsyncIterator

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import Settings, WorkerSettings
from flow_api.testing import Simulator
from tests.support import Api, WorkerFactory, cloud_settings, serving
from tests.support.processes import astop, env_for, flow_api, wait_for_workers
from tests.webhooks.conftest import FAST, rotate
from tests.webhooks.receiver import Receiver


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator) -> Settings:
    return cloud_settings(valkey.url, simulator.url, webhook=FAST)


@pytest.fixture
async def api(settings: Settings) -> AsyncIterator[Api]:
    async with serving(settings) as api:
        yield api


async def test_a_failed_job_sends_job_failed_with_its_error(
    api: Api, start_worker: WorkerFactory, receiver: Receiver, settings: Settings
) -> None:
    secret = await rotate(settings)
    await start_worker()
    job_id = await api.submit("[[sim:too-long:ctx]] boom", webhook={"url": receiver.url})
    assert (await api.wait(job_id))["status"] == "failed"
    got = await receiver.wait_for(1)
    payload = got[0].verify(secret)
    assert payload["type"] == "job.failed"
    assert payload["data"]["error"]["code"] == "context_too_long"


async def test_a_cancel_racing_the_finish_sends_one_event_of_the_final_status(
    api: Api,
    start_worker: WorkerFactory,
    receiver: Receiver,
    settings: Settings,
    simulator: Simulator,
) -> None:
    """Cancels aimed at the moment each job finishes: whichever side wins, the receiver gets
    one event per job, and its type is the status the API reports."""
    secret = await rotate(settings)
    seed = random.randrange(2**32)
    print(f"seed {seed}")
    rng = random.Random(seed)
    simulator.config.latency_s = 0.03
    await start_worker()
    lanes = asyncio.Semaphore(4)

    async def race(i: int) -> tuple[str, str]:
        async with lanes:
            job_id = await api.submit(f"[[sim:r{i}:ok]] race {i}", webhook={"url": receiver.url})
            await asyncio.sleep(rng.uniform(0.0, 0.3))
            await api.post(f"/api/ai/jobs/{job_id}/cancel")
            return job_id, (await api.wait(job_id, timeout_s=60))["status"]

    finals = dict(await asyncio.gather(*(race(i) for i in range(60))))
    got = await receiver.wait_for(len(finals))
    await asyncio.sleep(1.0)  # a second event for any job would have come by now
    counts = Counter(r.event_id for r in receiver.received)
    assert counts == Counter({f"evt_{job_id}": 1 for job_id in finals})
    sent = {r.event_id: r.verify(secret)["type"] for r in got}
    assert sent == {f"evt_{job_id}": f"job.{status}" for job_id, status in finals.items()}
    kinds = Counter(finals.values())
    print(f"endings: {dict(kinds)}")
    assert kinds["cancelled"] and kinds["completed"], "no cancel met a job near its end"


async def test_a_worker_killed_mid_delivery_leaves_it_to_another(
    valkey: EmbeddedValkey,
    simulator: Simulator,
    receiver: Receiver,
    start_worker: WorkerFactory,
) -> None:
    """The receiver holds the first request; the worker sending it is killed (SIGKILL); another
    worker sends the same event again once BullMQ finds the delivery stalled."""
    quick_recovery = WorkerSettings(
        concurrency=20, job_timeout_s=5, lock_duration_ms=2000, stalled_interval_ms=1000
    )
    settings = cloud_settings(valkey.url, simulator.url, webhook=FAST, worker=quick_recovery)
    secret = await rotate(settings)
    receiver.hang = True
    async with serving(settings) as api:
        process = flow_api("worker", env=env_for(settings))
        try:
            await wait_for_workers(settings, 1)
            job_id = await api.submit("deliver me", webhook={"url": receiver.url})
            assert (await api.wait(job_id))["status"] == "completed"
            await receiver.wait_for(1)
            process.send_signal(signal.SIGKILL)
            await astop(process, interrupt=False)
            receiver.hang = False
            receiver.release.set()
            await start_worker(settings)
            got = await receiver.wait_for(2, timeout_s=60)
        finally:
            if process.poll() is None:
                process.kill()
                await astop(process, interrupt=False)
    assert [r.event_id for r in got] == [f"evt_{job_id}"] * 2
    assert got[1].verify(secret)["data"]["jobId"] == job_id
