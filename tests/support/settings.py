"""The settings tests run with: the defaults a user gets, a fresh queue per test, and providers
pointed at the fake model or at the loopback simulator."""

from __future__ import annotations

import uuid
from typing import Any

from flow_api.embedded import free_port
from flow_api.settings import (
    AnthropicSettings,
    ApiSettings,
    AzureSettings,
    LocalSettings,
    OpenAISettings,
    ProviderSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)

PROVIDER_KEY = "sk-test-not-a-real-key"
SIM_MODEL = "gpt-sim"


def make_settings(redis_url: str, **sections: Any) -> Settings:
    """Test settings: fake provider on and default, local model off, fast retries."""
    base: dict[str, Any] = {
        "redis": RedisSettings(url=redis_url, queue_name=f"test-{uuid.uuid4().hex[:8]}"),
        "api": ApiSettings(port=free_port()),
        "worker": WorkerSettings(
            concurrency=20,
            job_timeout_s=5,
            backoff_base_ms=50,
            backoff_max_ms=500,
            shutdown_grace_s=5,
            stalled_interval_ms=5000,
            lock_duration_ms=10_000,
        ),
        "provider": ProviderSettings(fake_enabled=True, default="fake"),
        "local": LocalSettings(enabled=False),
    }
    base.update(sections)
    return Settings(**base)


def openai_on(sim_url: str, key: str = PROVIDER_KEY) -> OpenAISettings:
    """The OpenAI provider answered by the simulator at `sim_url` (its root URL)."""
    return OpenAISettings(api_key=key, base_url=f"{sim_url}/v1", model=SIM_MODEL)


def cloud_settings(redis_url: str, sim_url: str, **sections: Any) -> Settings:
    """Every cloud provider configured against the simulator; `openai` the default."""
    base: dict[str, Any] = {
        "provider": ProviderSettings(default="openai", fake_enabled=False),
        "openai": openai_on(sim_url),
        "azure": AzureSettings(api_key=PROVIDER_KEY, endpoint=sim_url, deployment="dep-sim"),
        "anthropic": AnthropicSettings(api_key=PROVIDER_KEY, base_url=sim_url, model="claude-sim"),
    }
    return make_settings(redis_url, **{**base, **sections})
