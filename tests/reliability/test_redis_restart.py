"""Valkey stopped (or killed) and restarted under load: every job that got a 202 completes, the
API answers 503 (never a 500, never a hang) while it is down, and everything recovers by itself."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.testing import Simulator
from tests.support import Api, cloud_settings, start_api
from tests.support.processes import astop, env_for, flow_api


@pytest.mark.timeout(180)
@pytest.mark.parametrize(
    ("appendfsync", "crash"),
    [("everysec", False), ("always", True)],
    ids=["everysec-restart", "always-sigkill"],
)
async def test_every_accepted_job_completes_across_a_restart(
    tmp_path: Path, simulator: Simulator, appendfsync: str, crash: bool
) -> None:
    valkey = EmbeddedValkey(tmp_path / "valkey", appendfsync=appendfsync)
    valkey.start()
    settings = cloud_settings(valkey.url, simulator.url)
    settings.worker.lock_duration_ms = 5000
    settings.worker.stalled_interval_ms = 1000
    simulator.config.latency_s = 0.3
    server, serving = await start_api(settings)
    worker = flow_api("worker", env=env_for(settings))
    accepted: list[str] = []
    unavailable = 0
    other: list[int] = []
    running = True
    base = f"http://127.0.0.1:{settings.api.port}"
    try:
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:

            async def submit_forever() -> None:
                nonlocal unavailable
                n = 0
                while running:
                    n += 1
                    answer = await client.post("/api/ai/generate", json={"prompt": f"job {n}"})
                    if answer.status_code == 202:
                        accepted.append(answer.json()["jobId"])
                    elif answer.status_code == 503:
                        assert answer.json()["error"]["code"] == "queue_unavailable"
                        unavailable += 1
                    else:
                        other.append(answer.status_code)
                    await asyncio.sleep(0.01)

            load = asyncio.create_task(submit_forever())
            await asyncio.sleep(2)
            before = len(accepted)
            if crash:
                valkey.kill()
            else:
                await asyncio.to_thread(valkey.stop)

            started = time.monotonic()
            down = await client.post("/api/ai/generate", json={"prompt": "while down"})
            took = time.monotonic() - started
            ready = await client.get("/readyz")
            assert (down.status_code, ready.status_code) == (503, 503)
            assert took < 3, f"a submit while Redis is down took {took:.2f} s"
            await asyncio.sleep(1.5)

            await asyncio.to_thread(valkey.start)
            await asyncio.sleep(3)
            running = False
            await load
            assert (await client.get("/readyz")).status_code == 200
            assert len(accepted) > before, "submits did not recover after the restart"

            api = Api(settings, client)
            for job_id in accepted:
                assert (await api.wait(job_id, timeout_s=90))["status"] == "completed"
    finally:
        running = False
        code, output = await astop(worker)
        server.should_exit = True
        await serving
        await asyncio.to_thread(valkey.stop)
    assert other == [], f"unexpected answers: {other}"
    assert code == 0, output[-3000:]
    print(
        f"\nValkey {'SIGKILL' if crash else 'restart'} (appendfsync {appendfsync}): "
        f"{len(accepted)} accepted, {len(accepted)} completed, 0 lost; "
        f"{unavailable} submits answered 503 while down"
    )
