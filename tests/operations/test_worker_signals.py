"""`flow-api worker` stops like a daemon should (issue 23 items 4-5): with Redis down, on a
second signal, and on SIGHUP."""

from __future__ import annotations

import asyncio
import signal
import time

import httpx
import pytest

from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.testing import Simulator
from tests.operations.conftest import Output, flow_api, openai_env, submit

WORKER_ENV = {
    "FLOW_PROVIDER_FAKE_ENABLED": "true",
    "FLOW_LOCAL_ENABLED": "false",
    "FLOW_WORKER_SHUTDOWN_GRACE_S": "2",
}


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGINT, signal.SIGHUP])
async def test_a_worker_that_never_reached_redis_stops_within_its_grace(
    sig: signal.Signals,
) -> None:
    closed = free_port()  # nothing listens there
    env = {**WORKER_ENV, "FLOW_REDIS_URL": f"redis://127.0.0.1:{closed}/0"}
    worker = flow_api("worker", env=env)
    output = Output(worker)
    await output.wait_for("worker consuming queue")
    await asyncio.sleep(1.0)  # well into its connection retries
    began = time.monotonic()
    worker.send_signal(sig)
    code = await output.exit(timeout_s=30)
    elapsed = time.monotonic() - began
    assert code == 0, output.text
    assert elapsed < 2 + 2.5, f"took {elapsed:.1f} s with a 2 s grace:\n{output.text}"
    assert "Traceback" not in output.text
    assert "worker stopped" in output.text


async def test_a_second_signal_hands_in_flight_jobs_back_at_once(
    valkey: EmbeddedValkey, simulator: Simulator
) -> None:
    simulator.config.latency_s = 60.0  # the job would outlast any wait
    queue = f"ops-{free_port()}"
    port = free_port()
    common = {
        **openai_env(simulator),
        "FLOW_LOCAL_ENABLED": "false",
        "FLOW_REDIS_URL": valkey.url,
        "FLOW_REDIS_QUEUE_NAME": queue,
    }
    api = flow_api("api", env={**common, "FLOW_API_PORT": str(port)})
    worker = flow_api("worker", env={**common, "FLOW_WORKER_SHUTDOWN_GRACE_S": "120"})
    api_output, output = Output(api), Output(worker)
    try:
        await api_output.wait_for("Application startup complete")
        await output.wait_for("worker consuming queue")
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            job_id = await submit(client, "a long one")
            deadline = time.monotonic() + 30
            while simulator.stats.in_flight < 1:
                assert time.monotonic() < deadline, output.text
                await asyncio.sleep(0.05)
            worker.send_signal(signal.SIGTERM)
            await output.wait_for("stopping (in-flight jobs get the grace period)")
            await asyncio.sleep(0.5)
            assert worker.poll() is None, "the first signal must wait for the job"
            began = time.monotonic()
            worker.send_signal(signal.SIGTERM)
            code = await output.exit(timeout_s=30)
            elapsed = time.monotonic() - began
            status = (await client.get(f"/api/ai/status/{job_id}")).json()["status"]
    finally:
        api.send_signal(signal.SIGINT)
        await api_output.exit()
        if worker.poll() is None:
            worker.kill()
    assert code == 0, output.text
    assert elapsed < 10, f"took {elapsed:.1f} s after the second signal"
    assert "Traceback" not in output.text
    # Handed back without spending an attempt: waiting for the next worker, not stuck active.
    assert status == "waiting", status


async def test_sighup_drains_an_api_process() -> None:
    port = free_port()
    env = {**WORKER_ENV, "FLOW_API_PORT": str(port), "FLOW_REDIS_URL": "redis://127.0.0.1:1/0"}
    api = flow_api("api", env=env)
    output = Output(api)
    await output.wait_for("Application startup complete")
    api.send_signal(signal.SIGHUP)
    assert await output.exit() == 0, output.text
    assert "Finished server process" in output.text
