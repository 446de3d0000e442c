"""The offline default end to end: HTTP → queue → worker → llama.cpp running the bundled Gemma 3
270M GGUF → result. Real model, real Valkey, real HTTP."""

from __future__ import annotations

import asyncio
import time
from pathlib import Path

import httpx
import pytest

from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.settings import LocalSettings, ProviderSettings, Settings
from tests.support import Api, WorkerFactory, make_settings
from tests.support.processes import astop, flow_api, wait_healthy

pytestmark = [pytest.mark.local_model, pytest.mark.timeout(300)]

QUESTION = "What is the capital of France?"


@pytest.fixture
def settings(valkey: EmbeddedValkey) -> Settings:
    settings = make_settings(
        valkey.url,
        provider=ProviderSettings(default="local", fake_enabled=False),
        local=LocalSettings(enabled=True),
    )
    settings.worker.concurrency = 4
    settings.worker.job_timeout_s = 120
    return settings


async def test_a_prompt_gets_real_text_and_the_same_seed_gives_the_same_text(
    api: Api, start_worker: WorkerFactory
) -> None:
    await start_worker()
    options = {"temperature": 0, "seed": 7, "maxTokens": 24}
    first, second = [await api.submit(QUESTION, **options) for _ in range(2)]
    texts = []
    for job_id in (first, second):
        assert (await api.wait(job_id, timeout_s=120))["status"] == "completed"
        result = (await api.client.get(f"/api/ai/result/{job_id}")).json()["result"]
        assert result["provider"] == "local"
        assert result["model"] == "gemma-3-270m-q4_k_m"
        assert result["text"].strip()
        assert result["usage"]["promptTokens"] > 0
        assert 0 < result["usage"]["completionTokens"] <= 24
        assert result["finishReason"] in ("stop", "length")
        texts.append(result["text"])
    assert texts[0] == texts[1]


async def test_the_api_stays_responsive_while_four_local_jobs_run(
    api: Api, start_worker: WorkerFactory
) -> None:
    await start_worker()
    ids = [await api.submit(f"{QUESTION} ({i})", maxTokens=48) for i in range(4)]
    for _ in range(400):  # wait until the model is busy
        views = [(await api.client.get(f"/api/ai/status/{i}")).json() for i in ids]
        if any(v["status"] == "active" for v in views):
            break
        await asyncio.sleep(0.05)
    latencies: list[float] = []
    while True:
        for path in ("/healthz", f"/api/ai/status/{ids[-1]}"):
            started = time.perf_counter()
            answer = await api.client.get(path)
            latencies.append(time.perf_counter() - started)
            assert answer.status_code == 200
        views = [(await api.client.get(f"/api/ai/status/{i}")).json() for i in ids]
        if all(v["status"] == "completed" for v in views):
            break
        await asyncio.sleep(0.02)
    latencies.sort()
    p95, slowest = latencies[int(len(latencies) * 0.95)], latencies[-1]
    print(
        f"\n/healthz and status while the model ran: "
        f"p95 {p95 * 1000:.1f} ms, max {slowest * 1000:.1f} ms"
    )
    # Generation on the event loop would stall every answer for seconds. A shared 2-core CI
    # machine can delay any one answer past 100 ms, so the bound is on the 95th percentile.
    assert p95 < 0.1
    assert slowest < 0.5


async def test_up_serves_the_local_model_with_no_keys(tmp_path: Path) -> None:
    port = free_port()
    env = {
        "FLOW_API_PORT": str(port),
        "FLOW_PROVIDER_FAKE_ENABLED": "false",
        "OPENAI_API_KEY": "",
        "ANTHROPIC_API_KEY": "",
        "AZURE_OPENAI_API_KEY": "",
    }
    process = flow_api("up", "--data-dir", str(tmp_path / "data"), env=env)
    base = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(base, process, timeout_s=60)
        async with httpx.AsyncClient(base_url=base, timeout=10) as client:
            api = Api(Settings(), client)
            job_id = await api.submit(QUESTION, maxTokens=16)
            assert (await api.wait(job_id, timeout_s=120))["status"] == "completed"
            result = (await client.get(f"/api/ai/result/{job_id}")).json()["result"]
    finally:
        code, output = await astop(process, timeout_s=30)
    assert code == 0, output
    assert "serving provider local (model gemma-3-270m-q4_k_m)" in output
    assert result["provider"] == "local" and result["text"].strip()
