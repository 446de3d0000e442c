"""The budget learns from every answer and no reservation can hurt others (real Valkey).

Learning from 429 headers, global cooldowns (a worker that never called the model holds off),
bounded reservations (capped at the model's output limit and one window), refunds on failure,
bounded put-backs, and the headers captured from the SDKs through the simulator.
"""

from __future__ import annotations

import contextlib
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
from flow_api.queue.consumer import JobDeferred
from flow_api.settings import AnthropicSettings, BudgetLimit, OpenAISettings, Settings
from flow_api.testing import Simulator
from tests.budget.conftest import budget_settings
from tests.budget.test_budget import StubJob

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


async def deferred_until(budget: RateBudget, job_id: str, model: str = "m") -> int | None:
    job = StubJob(job_id)
    with contextlib.suppress(JobDeferred):
        await budget.admit(job, "fake", model, HI)  # type: ignore[arg-type]
    return job.deferred_until


async def test_a_429s_headers_teach_the_limits_and_the_wait(valkey: EmbeddedValkey) -> None:
    settings = budget_settings(valkey, None, {})
    async with RateBudget(settings) as one, RateBudget(settings) as other:
        ticket = await one.admit(StubJob("a"), "fake", "m", HI)  # type: ignore[arg-type]
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
        hit = StubJob("a")
        # No Retry-After: the exhausted dimension's reset says how long to hold off.
        with contextlib.suppress(JobDeferred):
            await one.failed(hit, ticket, ProviderRateLimited("429", ratelimit=headers))  # type: ignore[arg-type]
        assert hit.deferred_until is not None and hit.deferred_until >= before + 1500
        waiting = StubJob("b")
        with contextlib.suppress(JobDeferred):
            await other.admit(waiting, "fake", "m", HI)  # type: ignore[arg-type]
        assert waiting.deferred_until is not None and waiting.deferred_until >= before + 1500
    assert (other.limits_for("fake", "m").requests, other.limits_for("fake", "m").tokens) == (
        600,
        90_000,
    )


async def test_a_cooldown_holds_a_worker_that_never_called_the_model(
    valkey: EmbeddedValkey,
) -> None:
    # No limits configured or known: the cooldown alone must stop the other worker's call.
    settings = budget_settings(valkey, None, {})
    async with RateBudget(settings) as one, RateBudget(settings) as fresh:
        ticket = await one.admit(StubJob("a"), "fake", "m", HI)  # type: ignore[arg-type]
        before = now_ms()
        with contextlib.suppress(JobDeferred):
            await one.failed(StubJob("a"), ticket, ProviderRateLimited("429", retry_after=20))  # type: ignore[arg-type]
        until = await deferred_until(fresh, "b")
    assert until is not None and until >= before + 20_000


async def test_a_reservation_is_capped_and_a_failed_call_gives_it_back(
    valkey: EmbeddedValkey,
) -> None:
    tpm = 60_000
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(tpm=tpm)})
    greedy = GenerateRequest(prompt="x" * 40, options=GenerateOptions(max_tokens=999_000))
    async with RateBudget(settings) as budget:
        warm = await budget.admit(StubJob("w"), "fake", "gpt-4o", HI)  # type: ignore[arg-type]
        await budget.failed(StubJob("w"), warm, ProviderRejected("warm-up"))  # type: ignore[arg-type]
        ticket = await budget.admit(StubJob("g"), "fake", "gpt-4o", greedy)  # type: ignore[arg-type]
        # Charged at most the model's output limit, not the 999 000 asked for...
        assert ticket.charge.tokens == 10 + output_limit("gpt-4o") == 10 + 16_384
        reserved = await field(settings, "gpt-4o", "t")
        # ...and never more than one minute (the limit's window) ahead.
        assert reserved - now_ms() <= MINUTE_MS + 100
        assert reserved - now_ms() > 10_000  # 16 394 of 60 000 a minute: ~16.7 s
        await budget.failed(StubJob("g"), ticket, ProviderRejected("400: max_tokens too large"))  # type: ignore[arg-type]
        assert await field(settings, "gpt-4o", "t") <= now_ms()  # all given back at once
        other = StubJob("o")
        await budget.admit(other, "fake", "gpt-4o", HI)  # type: ignore[arg-type]
        assert other.deferred_until is None  # another tenant's job goes at once


async def test_one_huge_request_moves_the_budget_at_most_one_window(
    valkey: EmbeddedValkey,
) -> None:
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(tpm=1_000)})
    greedy = GenerateRequest(prompt="hi", options=GenerateOptions(max_tokens=999_000))
    async with RateBudget(settings) as budget:
        warm = await budget.admit(StubJob("w"), "fake", "m", HI)  # type: ignore[arg-type]
        await budget.failed(StubJob("w"), warm, ProviderRejected("warm-up"))  # type: ignore[arg-type]
        await budget.admit(StubJob("g"), "fake", "m", greedy)  # type: ignore[arg-type]
        ahead = await field(settings, "m", "t") - now_ms()
    assert ahead <= MINUTE_MS + 100, f"{ahead / 1000:.0f} s ahead"


async def test_put_backs_are_bounded(valkey: EmbeddedValkey) -> None:
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(rpm=1)}, max_deferrals=3)
    async with RateBudget(settings) as budget:
        await budget.admit(StubJob("first"), "fake", "m", HI)  # type: ignore[arg-type]
        patient = StubJob("patient")
        patient.starts = 4  # put back 3 times already
        with pytest.raises(ProviderRateLimited, match="FLOW_BUDGET_MAX_DEFERRALS"):
            await budget.admit(patient, "fake", "m", HI)  # type: ignore[arg-type]
        assert patient.deferred_until is None
        # Nothing was reserved for it: the next job's place is the same as before.
        first_free = await deferred_until(budget, "next")
    assert first_free is not None and first_free - now_ms() <= 60_000


async def test_one_probe_call_while_nothing_is_known(valkey: EmbeddedValkey) -> None:
    settings = budget_settings(valkey, None, {})
    async with RateBudget(settings) as one, RateBudget(settings) as two:
        probe = await one.admit(StubJob("p"), "fake", "m", HI)  # type: ignore[arg-type]
        assert probe.probe
        held = await deferred_until(two, "q")
        assert held is not None  # the second waits for the probe's answer
        await one.failed(StubJob("p"), probe, ProviderRejected("no answer"))  # type: ignore[arg-type]
        retry = await two.admit(StubJob("q"), "fake", "m", HI)  # type: ignore[arg-type]
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
