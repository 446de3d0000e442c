"""The rate budget's arithmetic, without Redis: which limits apply and what a call reserves."""

from __future__ import annotations

from flow_api.budget import Amounts, RateBudget
from flow_api.budget.charges import Averages, ChargeModel, output_limit
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.settings import BudgetLimit, BudgetSettings, Settings


def budget(**limits: BudgetLimit) -> RateBudget:
    configured = {name.replace("__", "/").replace("_star", "*"): v for name, v in limits.items()}
    return RateBudget(Settings(budget=BudgetSettings(limits=configured, completion_tokens=100)))


def test_a_models_own_limit_wins_over_its_providers() -> None:
    rates = budget(openai__gpt=BudgetLimit(rpm=10), openai___star=BudgetLimit(rpm=99, tpm=5))
    assert rates.limits_for("openai", "gpt") == Amounts(requests=10)
    assert rates.limits_for("openai", "other") == Amounts(requests=99, tokens=5)
    assert rates.limits_for("anthropic", "claude") == Amounts()
    assert not Amounts().any and Amounts(tokens=1).any


def test_openai_is_charged_its_whole_max_tokens_up_front_and_the_default_otherwise() -> None:
    rates = budget()
    plain = GenerateRequest(prompt="p" * 10)
    capped = GenerateRequest(prompt="p" * 10, options=GenerateOptions(max_tokens=7))
    assert rates.estimate("openai", "gpt", plain) == 3 + 100
    assert rates.estimate("openai", "gpt", capped) == 3 + 7


def test_no_reservation_exceeds_the_models_output_limit() -> None:
    model = ChargeModel("openai", "gpt-unknown", 100)
    charge = model.before(40, 999_000, Averages())
    assert charge.output == output_limit("gpt-unknown") < 999_000
    assert model.before(40, None, Averages()).output == 100
