"""The budget learns from every answer and no reservation can hurt others (real Valkey).

Learning from 429 headers, global cooldowns (a worker that never called the model holds off),
bounded reservations (capped at the model's output limit and one window), refunds on failure,
bounded put-backs, and the headers captured from the SDKs through the simulator.
"""

from __future__ import annotations

import time

import pytest

from flow_api.budget import MINUTE_MS, RateBudget
from flow_api.budget.charges import output_limit
from flow_api.embedded import EmbeddedValkey
from flow_api.errors import ProviderRateLimited, ProviderRejected
from flow_api.keys import budget_key
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.pipeline import generate
from flow_api.providers.anthropic import AnthropicProvider
from flow_api.providers.openai import OpenAIProvider
from flow_api.queue.connection import connect
from flow_api.settings import AnthropicSettings, BudgetLimit, OpenAISettings, Settings
from flow_api.testing import Simulator
from tests.budget.conftest import MakeJobs, TakenJobs, budget_settings

HI = GenerateRequest(prompt="hello there")


def now_ms() -> int:
    return int(time.time() * 1000)


async def field(settings: Settings, model: str, name: str) -> float:
    client = connect(settings.redis)
    try:
        value = await client.hget(budget_key(settings.redis.queue_name, "fake", model), name)
    finally:
        await client.aclose()
    return float(value or 0)


async def deferred_until(budget: RateBudget, taken: TakenJobs, model: str = "m") -> int | None:
    """Admit a new real job; when the budget put it back (in BullMQ's delayed set), until."""
    job = await taken.take()
    return await taken.deferred(budget.admit(job, "fake", model, HI), job)


async def test_a_429s_headers_teach_the_limits_and_the_wait(
    valkey: EmbeddedValkey, jobs: MakeJobs
) -> None:
    settings = budget_settings(valkey, None, {})
    taken = jobs(settings)
    async with RateBudget(settings) as one, RateBudget(settings) as other:
        hit = await taken.take()
        ticket = await one.admit(hit, "fake", "m", HI)
        assert ticket.limits.requests == 0  # nothing known yet
        headers = {
            "x-ratelimit-limit-requests": "600",
            "x-ratelimit-remaining-requests": "0",
            "x-ratelimit-reset-requests": "1.5s",
            "x-ratelimit-limit-tokens": "90000",
            "x-ratelimit-remaining-tokens": "80000",
            "x-ratelimit-reset-tokens": "6ms",
        }
        before = now_ms()
        # No Retry-After: the exhausted dimension's reset says how long to hold off.
        limited = ProviderRateLimited("429", ratelimit=headers)
        hit_until = await taken.deferred(one.failed(hit, ticket, limited), hit)
        assert hit_until is not None and hit_until >= before + 1500
        waiting_until = await deferred_until(other, taken)
        assert waiting_until is not None and waiting_until >= before + 1500
    assert (other.limits_for("fake", "m").requests, other.limits_for("fake", "m").tokens) == (
        600,
        90_000,
    )


async def test_a_cooldown_holds_a_worker_that_never_called_the_model(
    valkey: EmbeddedValkey, jobs: MakeJobs
) -> None:
    # No limits configured or known: the cooldown alone must stop the other worker's call.
    settings = budget_settings(valkey, None, {})
    taken = jobs(settings)
    async with RateBudget(settings) as one, RateBudget(settings) as fresh:
        hit = await taken.take()
        ticket = await one.admit(hit, "fake", "m", HI)
        before = now_ms()
        limited = ProviderRateLimited("429", retry_after=20)
        assert await taken.deferred(one.failed(hit, ticket, limited), hit) is not None
        until = await deferred_until(fresh, taken)
    assert until is not None and until >= before + 20_000


async def test_a_reservation_is_capped_and_a_failed_call_gives_it_back(
    valkey: EmbeddedValkey, jobs: MakeJobs
) -> None:
    tpm = 60_000
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(tpm=tpm)})
    taken = jobs(settings)
    greedy = GenerateRequest(prompt="x" * 40, options=GenerateOptions(max_tokens=999_000))
    async with RateBudget(settings) as budget:
        first = await taken.take()
        warm = await budget.admit(first, "fake", "gpt-4o", HI)
        await budget.failed(first, warm, ProviderRejected("warm-up"))
        big = await taken.take()
        ticket = await budget.admit(big, "fake", "gpt-4o", greedy)
        # Charged at most the model's output limit, not the 999 000 asked for...
        assert ticket.charge.tokens == 10 + output_limit("gpt-4o") == 10 + 16_384
        reserved = await field(settings, "gpt-4o", "t")
        # ...and never more than one minute (the limit's window) ahead.
        assert reserved - now_ms() <= MINUTE_MS + 100
        assert reserved - now_ms() > 10_000  # 16 394 of 60 000 a minute: ~16.7 s
        await budget.failed(big, ticket, ProviderRejected("400: max_tokens too large"))
        assert await field(settings, "gpt-4o", "t") <= now_ms()  # all given back at once
        # another tenant's job goes at once
        assert await deferred_until(budget, taken, "gpt-4o") is None


async def test_one_huge_request_moves_the_budget_at_most_one_window(
    valkey: EmbeddedValkey, jobs: MakeJobs
) -> None:
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(tpm=1_000)})
    taken = jobs(settings)
    greedy = GenerateRequest(prompt="hi", options=GenerateOptions(max_tokens=999_000))
    async with RateBudget(settings) as budget:
        first = await taken.take()
        warm = await budget.admit(first, "fake", "m", HI)
        await budget.failed(first, warm, ProviderRejected("warm-up"))
        await budget.admit(await taken.take(), "fake", "m", greedy)
        ahead = await field(settings, "m", "t") - now_ms()
    assert ahead <= MINUTE_MS + 100, f"{ahead / 1000:.0f} s ahead"


async def test_put_backs_are_bounded(valkey: EmbeddedValkey, jobs: MakeJobs) -> None:
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(rpm=1)}, max_deferrals=3)
    taken = jobs(settings)
    async with RateBudget(settings) as budget:
        await budget.admit(await taken.take(), "fake", "m", HI)
        patient = await taken.take()
        for _ in range(3):  # put back in BullMQ's delayed set, brought back, taken again
            assert await taken.deferred(budget.admit(patient, "fake", "m", HI), patient)
            patient = await taken.retake(patient)
        assert (patient.starts, patient.attempt) == (4, 1)  # no attempt spent by waiting
        with pytest.raises(ProviderRateLimited, match="FLOW_BUDGET_MAX_DEFERRALS"):
            await budget.admit(patient, "fake", "m", HI)
        assert await taken.state(patient) == "active"  # not put back a fourth time
        # Nothing was reserved for it: the next job's place is the same as before.
        first_free = await deferred_until(budget, taken)
    assert first_free is not None and first_free - now_ms() <= 60_000


async def test_one_probe_call_while_nothing_is_known(
    valkey: EmbeddedValkey, jobs: MakeJobs
) -> None:
    settings = budget_settings(valkey, None, {})
    taken = jobs(settings)
    async with RateBudget(settings) as one, RateBudget(settings) as two:
        first = await taken.take()
        probe = await one.admit(first, "fake", "m", HI)
        assert probe.probe
        second = await taken.take()
        held = await taken.deferred(two.admit(second, "fake", "m", HI), second)
        assert held is not None  # the second waits for the probe's answer
        await one.failed(first, probe, ProviderRejected("no answer"))
        retry = await two.admit(await taken.retake(second), "fake", "m", HI)
        assert retry.probe  # a failed probe hands the turn to the next call


async def test_openai_429_headers_reach_the_error(simulator: Simulator) -> None:
    simulator.config.rpm = 600
    provider = OpenAIProvider(
        OpenAISettings(api_key="sk-test", base_url=simulator.base_url, model="gpt-sim"), 10
    )
    try:
        with pytest.raises(ProviderRateLimited) as info:
            await generate(provider, "gpt-sim", GenerateRequest(prompt="[[sim:h:429@2]] hi"))
    finally:
        await provider.aclose()
    assert info.value.ratelimit["x-ratelimit-limit-requests"] == "600"
    assert info.value.ratelimit["retry-after"] == "2"


async def test_anthropic_headers_are_captured_on_answers(simulator: Simulator) -> None:
    simulator.config.rpm, simulator.config.itpm, simulator.config.otpm = 50, 30_000, 8_000
    provider = AnthropicProvider(
        AnthropicSettings(api_key="sk-ant-test", base_url=simulator.anthropic_url), 10
    )
    seen: dict[str, object] = {}
    try:
        await generate(provider, "claude-sim", GenerateRequest(prompt="hi"), observe=seen.update)
    finally:
        await provider.aclose()
    headers = seen["ratelimit"]
    assert isinstance(headers, dict)
    assert headers["anthropic-ratelimit-input-tokens-limit"] == "30000"
    assert headers["anthropic-ratelimit-output-tokens-limit"] == "8000"
    assert int(headers["anthropic-ratelimit-requests-remaining"]) == 49
