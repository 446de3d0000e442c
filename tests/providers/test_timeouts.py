"""`timeoutMs` is the attempt's real limit: the SDK clients never cut a call earlier (which made
a second paid call of a job the client allowed more time), and a limit past the documented
maximum is refused at submit."""

from __future__ import annotations

import uuid

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.providers import build_registry
from flow_api.settings import ProviderSettings, Settings, WorkerSettings
from flow_api.testing import Simulator
from tests.support import Api, cloud_settings, serving
from tests.support.servers import WorkerFactory


def slow_settings(valkey: EmbeddedValkey, simulator: Simulator, family: str) -> Settings:
    """A 1 s default attempt limit (`FLOW_WORKER_JOB_TIMEOUT_S`), every SDK provider on the
    simulator, `family` the default."""
    settings = cloud_settings(valkey.url, simulator.url)
    worker = settings.worker.model_copy(update={"job_timeout_s": 1.0})
    provider = ProviderSettings(default=family, fake_enabled=False)
    return settings.model_copy(update={"worker": worker, "provider": provider})


@pytest.mark.parametrize("family", ["openai", "azure", "anthropic"])
async def test_timeout_ms_above_the_worker_default_is_the_calls_limit(
    valkey: EmbeddedValkey, simulator: Simulator, start_worker: WorkerFactory, family: str
) -> None:
    settings = slow_settings(valkey, simulator, family)
    key = f"slow-{uuid.uuid4().hex[:8]}"
    await start_worker(settings)
    async with serving(settings) as api:
        # 2 s to answer: past the 1 s worker default, within the job's own 4 s.
        job_id = await api.submit(f"[[sim:{key}:hang@2]] take your time", timeoutMs=4000)
        final = await api.wait(job_id, timeout_s=30)
        record = await api.record(job_id)
    assert final["status"] == "completed", record
    assert simulator.stats.by_key[key] == 1  # one paid call: not cut, not retried
    assert [a.get("error") for a in record["attempts"]] == [None]


async def test_a_call_past_timeout_ms_is_a_timeout_at_that_limit(
    valkey: EmbeddedValkey, simulator: Simulator, start_worker: WorkerFactory
) -> None:
    settings = slow_settings(valkey, simulator, "openai")
    worker = settings.worker.model_copy(update={"attempts": 1})
    settings = settings.model_copy(update={"worker": worker})
    key = f"hang-{uuid.uuid4().hex[:8]}"
    await start_worker(settings)
    async with serving(settings) as api:
        job_id = await api.submit(f"[[sim:{key}:hang]] never", timeoutMs=1500)
        final = await api.wait(job_id, timeout_s=30)
        record = await api.record(job_id)
    assert final["status"] == "failed"
    [attempt] = record["attempts"]
    assert attempt["error"]["code"] == "provider_timeout"
    assert "1.5 s" in attempt["error"]["message"]
    assert simulator.stats.by_key[key] == 1


def test_sdk_clients_wait_longer_than_any_attempt_may_last(
    valkey: EmbeddedValkey, simulator: Simulator
) -> None:
    settings = cloud_settings(valkey.url, simulator.url)
    registry = build_registry(settings)
    limit = settings.worker.max_job_timeout_s
    for name in ("openai", "azure", "anthropic"):
        client_timeout = registry.get(name).client_timeout_s
        assert client_timeout > limit >= settings.worker.job_timeout_s, name


async def test_timeout_ms_past_the_maximum_is_refused_at_submit(
    valkey: EmbeddedValkey, api: Api, settings: Settings
) -> None:
    limit_ms = round(settings.worker.max_job_timeout_s * 1000)
    answer = await api.post(
        "/api/ai/generate", {"prompt": "hi", "options": {"timeoutMs": limit_ms + 1}}
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["field"] == "options.timeoutMs"
    assert f"at most {limit_ms} ms" in error["message"]
    assert "FLOW_WORKER_MAX_JOB_TIMEOUT_S" in error["message"]
    ok = await api.post("/api/ai/generate", {"prompt": "hi", "options": {"timeoutMs": limit_ms}})
    assert ok.status_code == 202, ok.text
    assert WorkerSettings().max_job_timeout_s == 3600
