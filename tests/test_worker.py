"""The worker's attempt loop against a scripted chat model (the LLM boundary is the only fake)."""

from __future__ import annotations

from typing import Any

from flow_api.errors import (
    ProviderAuthFailed,
    ProviderRateLimited,
    ProviderUnavailable,
)
from flow_api.providers import ProviderRegistry
from flow_api.queue.consumer import retry_delay_ms
from flow_api.settings import Settings, WorkerSettings
from tests.support import Api, WorkerFactory
from tests.support.scripted import ScriptedProvider


async def run_script(
    api: Api,
    start_worker: WorkerFactory,
    settings: Settings,
    prompt: str,
    script: list[Any],
    **options: Any,
) -> tuple[dict[str, Any], ScriptedProvider]:
    provider = ScriptedProvider({prompt: script})
    await start_worker(settings, ProviderRegistry([provider]))
    job_id = await api.submit(prompt, **options)
    await api.wait(job_id)
    record: dict[str, Any] = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
    return record, provider


async def test_retryable_errors_are_retried_until_success(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    script = [ProviderUnavailable("boom"), ProviderRateLimited("slow down", retry_after=0.2), None]
    record, provider = await run_script(api, start_worker, settings, "p", script)
    assert record["status"] == "completed"
    assert record["result"]["text"] == "ok 3"
    codes = [a.get("error", {}).get("code") for a in record["attempts"]]
    assert codes == ["provider_unavailable", "provider_rate_limited", None]
    assert provider.model.calls["p"] == 3
    first_end = record["attempts"][1]["finishedAt"]
    third_start = record["attempts"][2]["startedAt"]
    assert third_start > first_end  # ordered, and the 429 delay happened in between


async def test_non_retryable_error_fails_at_once(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    record, provider = await run_script(
        api, start_worker, settings, "q", [ProviderAuthFailed("bad key"), None]
    )
    assert record["status"] == "failed"
    assert provider.model.calls["q"] == 1
    assert record["error"] == {
        "code": "provider_auth_failed",
        "message": "bad key",
        "retryable": False,
        "attempts": 1,
    }
    status = (await api.client.get(f"/api/ai/status/{record['jobId']}")).json()
    assert status["error"]["code"] == "provider_auth_failed"
    assert status["attempts"] == 1
    result = await api.client.get(f"/api/ai/result/{record['jobId']}")
    assert result.status_code == 409
    assert result.json()["error"]["code"] == "job_failed"
    assert result.json()["error"]["cause"]["code"] == "provider_auth_failed"


async def test_attempts_are_bounded(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    settings.worker.attempts = 3
    record, provider = await run_script(
        api, start_worker, settings, "r", [ProviderUnavailable("down")]
    )
    assert record["status"] == "failed"
    assert provider.model.calls["r"] == 3
    assert len(record["attempts"]) == 3
    assert record["error"]["retryable"] is True  # it was retryable; attempts ran out


async def test_a_hung_call_times_out_and_is_retried(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    record, _ = await run_script(api, start_worker, settings, "s", [30.0, None], timeoutMs=300)
    assert record["status"] == "completed"
    assert record["attempts"][0]["error"]["code"] == "provider_timeout"


def test_backoff_grows_with_jitter_and_honours_retry_after() -> None:
    s = WorkerSettings(backoff_base_ms=1000, backoff_max_ms=8000)
    plain = ProviderUnavailable("x")
    for attempts, low, high in [(1, 500, 1000), (2, 1000, 2000), (3, 2000, 4000), (9, 4000, 8000)]:
        delays = {retry_delay_ms(s, attempts, plain) for _ in range(50)}
        assert all(low <= d <= high for d in delays), (attempts, delays)
        assert len(delays) > 1  # jittered
    limited = ProviderRateLimited("x", retry_after=30)
    assert retry_delay_ms(s, 1, limited) == 30_000
