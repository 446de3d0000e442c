"""Fixtures for the provider paths: the loopback simulator and settings that point at it."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import (
    AnthropicSettings,
    AzureSettings,
    OpenAISettings,
    ProviderSettings,
    Settings,
)
from flow_api.testing import Simulator, SimulatorConfig
from tests.conftest import make_settings

PROVIDER_KEY = "sk-test-not-a-real-key"


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig(retry_after_s=0.2))
    await sim.start()
    yield sim
    await sim.stop()


def cloud_settings(valkey: EmbeddedValkey, sim_url: str, **sections: object) -> Settings:
    """Every cloud provider configured against the simulator; `openai` the default."""
    return make_settings(
        valkey.url,
        provider=ProviderSettings(default="openai", fake_enabled=False),
        openai=OpenAISettings(api_key=PROVIDER_KEY, base_url=f"{sim_url}/v1", model="gpt-sim"),
        azure=AzureSettings(api_key=PROVIDER_KEY, endpoint=sim_url, deployment="dep-sim"),
        anthropic=AnthropicSettings(api_key=PROVIDER_KEY, base_url=sim_url, model="claude-sim"),
        **sections,
    )


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator) -> Settings:
    return cloud_settings(valkey, simulator.url)
