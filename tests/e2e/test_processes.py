"""Real processes: `flow-api up`, and several `flow-api worker` processes sharing one queue."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections import Counter
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from flow_api.embedded import free_port
from flow_api.settings import Settings
from tests.conftest import Api


def flow_api(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    return subprocess.Popen(
        [sys.executable, "-m", "flow_api.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def stop(
    process: subprocess.Popen[bytes], timeout_s: float = 20, *, interrupt: bool = True
) -> tuple[int, str]:
    if interrupt and process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"process did not stop in {timeout_s} s:\n{output.decode()}") from None
    return process.returncode, output.decode()


def env_for(settings: Settings) -> dict[str, str]:
    return {
        "FLOW_REDIS_URL": settings.redis.url,
        "FLOW_REDIS_QUEUE_NAME": settings.redis.queue_name,
        "FLOW_PROVIDER_FAKE_ENABLED": "true",
        "FLOW_PROVIDER_DEFAULT": "fake",
        "FLOW_LOCAL_ENABLED": "false",
        "FLOW_WORKER_CONCURRENCY": "50",
    }


async def wait_healthy(base: str, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with httpx.AsyncClient(base_url=base) as client:
        while asyncio.get_running_loop().time() < deadline:
            assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("service did not become healthy")


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
        code, output = stop(first)
    assert code == 0, output
    assert "serving provider fake" in output
    assert (data / "appendonlydir").is_dir()

    second = flow_api("up", "--data-dir", str(data), env=up_env)
    try:
        await wait_healthy(base, second)
        async with httpx.AsyncClient(base_url=base) as client:
            result = await client.get(f"/api/ai/result/{job_id}")
    finally:
        code, output = stop(second)
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
    code, output = stop(process, timeout_s=30, interrupt=False)
    assert code == 2
    assert "pip install 'flow-api[local]'" in output
    assert "OPENAI_API_KEY" in output


async def test_two_worker_processes_share_a_batch_and_run_each_job_once(
    api: Api, settings: Settings
) -> None:
    env = env_for(settings)
    workers = [flow_api("worker", env=env) for _ in range(2)]
    try:
        ids = await asyncio.gather(*(api.submit(f"job {i}") for i in range(200)))
        for job_id in ids:
            assert (await api.wait(job_id, timeout_s=60))["status"] == "completed"
    finally:
        outputs = [stop(w) for w in workers]
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
