"""Every cloud provider end to end (HTTP → queue → worker → official SDK → loopback simulator),
and each provider fault: bounded retries with backoff, terminal failures with their reason."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest

from flow_api.settings import Settings
from flow_api.testing import Simulator
from flow_api.worker import FlowWorker
from tests.support import Api, WorkerFactory


async def record_of(api: Api, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
    return body


@pytest.mark.parametrize(
    ("provider", "model"),
    [("openai", "gpt-sim"), ("azure", "dep-sim"), ("anthropic", "claude-sim")],
)
async def test_a_batch_completes_through_each_provider(
    api: Api, worker: FlowWorker, simulator: Simulator, provider: str, model: str
) -> None:
    prompts = [f"question number {i}" for i in range(40)]
    ids = await asyncio.gather(*(api.submit(p, provider=provider, maxTokens=50) for p in prompts))
    for job_id, prompt in zip(ids, prompts, strict=True):
        assert (await api.wait(job_id))["status"] == "completed"
        body = (await api.client.get(f"/api/ai/result/{job_id}")).json()["result"]
        assert body["text"] == f"sim: {prompt}"
        assert body["provider"] == provider
        assert body["model"] == model
        assert body["usage"]["promptTokens"] == 3
        assert body["usage"]["completionTokens"] == 4
        assert body["usage"]["totalTokens"] == 7
        assert body["finishReason"] in ("stop", "end_turn")
    assert simulator.stats.requests == 40


async def test_500_then_429_then_hang_then_success(
    api: Api, worker: FlowWorker, simulator: Simulator
) -> None:
    job_id = await api.submit("[[sim:r1:500,429@0.3,hang,ok]] hello", timeoutMs=1000)
    status = await api.wait(job_id, timeout_s=30)
    assert status["status"] == "completed"
    record = await record_of(api, job_id)
    codes = [a.get("error", {}).get("code") for a in record["attempts"]]
    assert codes == ["provider_unavailable", "provider_rate_limited", "provider_timeout", None]
    assert record["result"]["text"] == "sim: hello"
    assert simulator.stats.by_key["r1"] == 4
    second_end = record["attempts"][1]["finishedAt"]
    third_start = record["attempts"][2]["startedAt"]
    gap = _seconds(third_start) - _seconds(second_end)
    assert gap >= 0.29, f"the 429's Retry-After (0.3 s) was not honoured: {gap:.3f} s"


async def test_a_400_fails_at_once(api: Api, worker: FlowWorker, simulator: Simulator) -> None:
    job_id = await api.submit("[[sim:r2:400,ok]] bad")
    status = await api.wait(job_id)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "provider_rejected"
    assert status["error"]["retryable"] is False
    assert status["error"]["attempts"] == 1
    assert simulator.stats.by_key["r2"] == 1
    assert "400" in status["error"]["message"]


@pytest.mark.parametrize(
    ("script", "code"),
    [
        ("401", "provider_auth_failed"),
        ("403", "provider_auth_failed"),
        ("ctx", "context_too_long"),
        ("filter", "content_filtered"),
    ],
)
async def test_non_retryable_faults(
    api: Api, worker: FlowWorker, simulator: Simulator, script: str, code: str
) -> None:
    job_id = await api.submit(f"[[sim:nr-{script}:{script},ok]] x")
    status = await api.wait(job_id)
    assert (status["status"], status["error"]["code"]) == ("failed", code)
    assert simulator.stats.by_key[f"nr-{script}"] == 1


@pytest.mark.parametrize("script", ["502", "503", "429-", "malformed", "reset", "hang"])
async def test_retryable_faults_then_success(
    api: Api, worker: FlowWorker, simulator: Simulator, script: str
) -> None:
    job_id = await api.submit(f"[[sim:ok-{script}:{script},ok]] x", timeoutMs=800)
    status = await api.wait(job_id, timeout_s=20)
    assert status["status"] == "completed", status
    # A 429 puts the job back to wait for the model's cooldown without spending an attempt.
    assert status["attempts"] == (1 if script.startswith("429") else 2)
    assert simulator.stats.by_key[f"ok-{script}"] == 2


async def test_persistent_faults_end_in_a_failure_with_reason_and_attempts(
    api: Api, start_worker: WorkerFactory, settings: Settings, simulator: Simulator
) -> None:
    settings.worker.attempts = 3
    await start_worker(settings)
    job_id = await api.submit("[[sim:down:503]] x")
    status = await api.wait(job_id, timeout_s=20)
    assert status["status"] == "failed"
    assert status["error"] == {
        "code": "provider_unavailable",
        "message": status["error"]["message"],
        "retryable": True,
        "attempts": 3,
    }
    assert "503" in status["error"]["message"]
    assert simulator.stats.by_key["down"] == 3


async def test_refused_connections_are_retried_then_fail(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    settings.worker.attempts = 2
    settings.openai.base_url = "http://127.0.0.1:9/v1"  # nothing listens on the discard port
    await start_worker(settings)
    job_id = await api.submit("x")
    status = await api.wait(job_id, timeout_s=20)
    assert status["status"] == "failed"
    assert status["error"]["code"] == "provider_unavailable"
    assert status["error"]["attempts"] == 2


def _seconds(iso: str) -> float:
    from datetime import datetime

    return datetime.fromisoformat(iso).timestamp()
