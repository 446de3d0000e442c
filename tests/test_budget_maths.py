"""The rate budget's arithmetic, without Redis: which limits apply and what a call reserves."""

from __future__ import annotations

from flow_api.budget import Limits, RateBudget
from flow_api.jobs import estimate_tokens
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.settings import BudgetLimit, BudgetSettings, Settings


def budget(**limits: BudgetLimit) -> RateBudget:
    configured = {name.replace("__", "/").replace("_star", "*"): v for name, v in limits.items()}
    return RateBudget(Settings(budget=BudgetSettings(limits=configured, completion_tokens=100)))


def test_a_models_own_limit_wins_over_its_providers() -> None:
    rates = budget(openai__gpt=BudgetLimit(rpm=10), openai___star=BudgetLimit(rpm=99, tpm=5))
    assert rates.limits_for("openai", "gpt") == Limits(rpm=10, tpm=0)
    assert rates.limits_for("openai", "other") == Limits(rpm=99, tpm=5)
    assert rates.limits_for("anthropic", "claude") == Limits()
    assert not Limits().any and Limits(tpm=1).any


def test_the_budget_reserves_the_one_estimate_with_its_default_completion() -> None:
    rates = budget()
    plain = GenerateRequest(prompt="p" * 10)
    capped = GenerateRequest(prompt="p" * 10, options=GenerateOptions(max_tokens=7))
    assert rates.estimate("openai", "gpt", plain) == estimate_tokens(plain, 100) == 3 + 100
    assert rates.estimate("openai", "gpt", capped) == 3 + 7
