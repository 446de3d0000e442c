"""Real processes: `flow-api up`, and several `flow-api worker` processes sharing one queue."""

from __future__ import annotations

import asyncio
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flow_api.embedded import free_port
from flow_api.settings import Settings
from tests.support import Api
from tests.support.processes import astop, env_for, flow_api, wait_for_workers, wait_healthy


@pytest.fixture
def up_env(tmp_path: Path) -> Iterator[dict[str, str]]:
    yield {
        "FLOW_PROVIDER_FAKE_ENABLED": "true",
        "FLOW_PROVIDER_DEFAULT": "fake",
        "FLOW_LOCAL_ENABLED": "false",
        "FLOW_API_PORT": str(free_port()),
    }


async def test_up_serves_a_prompt_and_keeps_jobs_across_restarts(
    tmp_path: Path, up_env: dict[str, str]
) -> None:
    data = tmp_path / "data"
    base = f"http://127.0.0.1:{up_env['FLOW_API_PORT']}"
    first = flow_api("up", "--data-dir", str(data), env=up_env)
    try:
        await wait_healthy(base, first)
        async with httpx.AsyncClient(base_url=base) as client:
            api = Api(Settings(), client)
            job_id = await api.submit("through the whole stack")
            assert (await api.wait(job_id))["status"] == "completed"
    finally:
        code, output = await astop(first)
    assert code == 0, output
    assert "serving provider fake" in output
    assert (data / "appendonlydir").is_dir()

    second = flow_api("up", "--data-dir", str(data), env=up_env)
    try:
        await wait_healthy(base, second)
        async with httpx.AsyncClient(base_url=base) as client:
            result = await client.get(f"/api/ai/result/{job_id}")
    finally:
        code, output = await astop(second)
    assert code == 0, output
    assert result.status_code == 200
    assert result.json()["result"]["text"] == "echo: through the whole stack"


async def test_up_without_any_provider_says_what_to_install(
    tmp_path: Path, up_env: dict[str, str]
) -> None:
    env = {**up_env, "FLOW_PROVIDER_FAKE_ENABLED": "false", "FLOW_PROVIDER_DEFAULT": ""}
    env = {k: v for k, v in env.items() if v}
    for name in ("OPENAI_API_KEY", "ANTHROPIC_API_KEY", "AZURE_OPENAI_API_KEY", "OPENAI_BASE_URL"):
        env[name] = ""
    process = flow_api("up", "--data-dir", str(tmp_path / "d"), env=env)
    code, output = await astop(process, timeout_s=30, interrupt=False)
    assert code == 2
    assert "pip install 'flow-api[local]'" in output
    assert "OPENAI_API_KEY" in output


async def test_two_worker_processes_share_a_batch_and_run_each_job_once(
    api: Api, settings: Settings
) -> None:
    env = env_for(settings)
    workers = [flow_api("worker", env=env) for _ in range(2)]
    try:
        await wait_for_workers(settings, 2)
        ids = await asyncio.gather(*(api.submit(f"job {i}") for i in range(200)))
        for job_id in ids:
            assert (await api.wait(job_id, timeout_s=60))["status"] == "completed"
    finally:
        outputs = [await astop(w) for w in workers]
    assert all(code == 0 for code, _ in outputs), outputs
    attempts_per_job: Counter[str] = Counter()
    ran_on: Counter[str] = Counter()
    for job_id in ids:
        record = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
        attempts_per_job[job_id] = len(record["attempts"])
        ran_on[record["attempts"][0]["worker"]] += 1
    assert set(attempts_per_job.values()) == {1}, "a job ran more than once"
    assert len(ran_on) == 2, f"both processes should take work: {ran_on}"
    assert sum(ran_on.values()) == 200
