"""Each provider family's tokens reach the job's stream as the provider produces them: OpenAI,
Azure and Anthropic through their SDKs against the simulator's streaming mode, and the local
model (llama.cpp in a model process) over its process protocol."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from importlib.util import find_spec

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import LocalSettings, ProviderSettings
from flow_api.testing import Simulator, SimulatorConfig
from tests.streaming.support import read_stream, streamed_text
from tests.support import WorkerFactory, cloud_settings, make_settings, serving

PROMPT = "tell me a story about streams that run to the sea past towns and hills and fields"


@pytest.fixture
async def paced_sim() -> AsyncIterator[Simulator]:
    """The simulator producing 50 tokens a second, so an answer comes in many pieces."""
    async with Simulator(SimulatorConfig(tokens_per_s=50)) as sim:
        yield sim


@pytest.mark.parametrize("family", ["openai", "azure", "anthropic"])
async def test_a_cloud_providers_tokens_stream_and_resume(
    family: str, valkey: EmbeddedValkey, paced_sim: Simulator, start_worker: WorkerFactory
) -> None:
    settings = cloud_settings(
        valkey.url, paced_sim.url, provider=ProviderSettings(default=family, fake_enabled=False)
    )
    async with serving(settings) as api:
        job_id = await api.submit(PROMPT, maxTokens=60)
        first = await read_stream(api.client, job_id, stop_after=1)  # watched from the start
        await start_worker(settings)
        first = await read_stream(api.client, job_id, stop_after=4)
        rest = await read_stream(api.client, job_id, last_event_id=first[-1].id)
        whole = await read_stream(api.client, job_id)
        assert first + rest == whole
        result = (await api.client.get(f"/api/ai/result/{job_id}")).json()
        assert whole[-1].event == "result" and whole[-1].data == result
        assert result["result"]["provider"] == family
        assert result["result"]["usage"]["completionTokens"] > 0, "usage is kept when streamed"
        tokens = [e for e in whole if e.event == "token"]
        assert len(tokens) > 2, "the answer arrived in pieces"
        assert streamed_text(whole) == result["result"]["text"]
        assert paced_sim.stats.requests >= 1


@pytest.mark.local_model
@pytest.mark.timeout(300)
@pytest.mark.skipif(find_spec("llama_cpp") is None, reason="needs the `local` extra")
async def test_the_local_models_tokens_stream_and_resume(
    valkey: EmbeddedValkey, start_worker: WorkerFactory
) -> None:
    settings = make_settings(
        valkey.url,
        provider=ProviderSettings(default="local", fake_enabled=False),
        local=LocalSettings(enabled=True),
    )
    settings.worker.job_timeout_s = 120
    async with serving(settings) as api:
        job_id = await api.submit("What is the capital of France?", maxTokens=40, seed=3)
        reading = asyncio.create_task(read_stream(api.client, job_id, read_timeout_s=240))
        await asyncio.sleep(0.2)  # watched before its attempt starts: tokens are streamed
        await start_worker(settings)
        whole = await reading
        result = (await api.client.get(f"/api/ai/result/{job_id}")).json()
        assert whole[-1].event == "result", whole[-1]
        assert streamed_text(whole) == result["result"]["text"]
        assert len([e for e in whole if e.event == "token"]) > 1
        cut = len(whole) // 2
        first = await read_stream(api.client, job_id, stop_after=cut)
        rest = await read_stream(api.client, job_id, last_event_id=first[-1].id)
        assert first + rest == whole
