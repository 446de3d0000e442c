"""Fixtures for the rate budget: the provider simulator and settings pointing workers at it."""

from __future__ import annotations

from typing import Any

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import (
    BudgetLimit,
    BudgetSettings,
    OpenAISettings,
    ProviderSettings,
    Settings,
)
from flow_api.testing import Simulator
from tests.support import make_settings

MODEL = "gpt-sim"


def budget_settings(
    valkey: EmbeddedValkey, sim: Simulator | None, limits: dict[str, BudgetLimit], **extra: Any
) -> Settings:
    """Test settings with these budget limits; OpenAI on the simulator when there is one."""
    sections: dict[str, Any] = {"budget": BudgetSettings(limits=limits, **extra)}
    if sim is not None:
        sections["provider"] = ProviderSettings(default="openai", fake_enabled=True)
        sections["openai"] = OpenAISettings(
            api_key="sk-test-not-a-real-key", base_url=sim.base_url, model=MODEL
        )
    return make_settings(valkey.url, **sections)
