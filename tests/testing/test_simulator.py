"""The provider simulator, driven through the official OpenAI and Anthropic SDKs."""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import AsyncIterator, Iterator

import anthropic
import httpx
import openai
import pytest
from openai.types.chat import ChatCompletionMessageParam

from flow_api.testing import Simulator, SimulatorProcess
from flow_api.testing.limits import RateLimits, SlidingWindow, format_reset
from flow_api.testing.script import ScriptError, StepKind, parse_steps


@pytest.fixture
async def sim() -> AsyncIterator[Simulator]:
    async with Simulator() as simulator:
        yield simulator


@pytest.fixture
async def oai(sim: Simulator) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(api_key="sk-test", base_url=sim.base_url, max_retries=0, timeout=5)
    yield client
    await client.close()


@pytest.fixture
async def claude(sim: Simulator) -> AsyncIterator[anthropic.AsyncAnthropic]:
    client = anthropic.AsyncAnthropic(
        api_key="sk-ant-test", base_url=sim.anthropic_url, max_retries=0, timeout=5
    )
    yield client
    await client.close()


async def ask(
    client: openai.AsyncOpenAI,
    prompt: str,
    *,
    max_tokens: int | None = None,
    client_timeout: float = 5,
) -> str:
    answer = await client.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": prompt}],
        max_tokens=max_tokens,
        timeout=client_timeout,
    )
    return answer.choices[0].message.content or ""


# --- answers ----------------------------------------------------------------------------------


async def test_openai_answer_and_usage(sim: Simulator, oai: openai.AsyncOpenAI) -> None:
    answer = await oai.chat.completions.create(
        model="gpt-test",
        messages=[
            {"role": "system", "content": "be brief"},
            {"role": "user", "content": "hello simulated world"},
        ],
    )
    choice = answer.choices[0]
    assert choice.message.content == "sim: hello simulated world"
    assert choice.finish_reason == "stop"
    assert answer.model == "gpt-test"
    assert answer.usage is not None
    assert (answer.usage.prompt_tokens, answer.usage.completion_tokens) == (5, 4)
    assert answer.usage.total_tokens == 9
    assert sim.stats.requests == 1
    assert sim.stats.by_status == {200: 1}
    assert (sim.stats.prompt_tokens, sim.stats.tokens_served) == (5, 4)


@pytest.mark.parametrize("limit", ["max_tokens", "max_completion_tokens"])
async def test_openai_max_tokens_truncates(oai: openai.AsyncOpenAI, limit: str) -> None:
    messages: list[ChatCompletionMessageParam] = [{"role": "user", "content": "one two three four"}]
    if limit == "max_tokens":
        answer = await oai.chat.completions.create(model="m", messages=messages, max_tokens=3)
    else:
        answer = await oai.chat.completions.create(
            model="m", messages=messages, max_completion_tokens=3
        )
    assert answer.choices[0].message.content == "sim: one two"
    assert answer.choices[0].finish_reason == "length"
    assert answer.usage is not None and answer.usage.completion_tokens == 3


async def test_anthropic_answer_usage_and_truncation(claude: anthropic.AsyncAnthropic) -> None:
    answer = await claude.messages.create(
        model="claude-test",
        max_tokens=100,
        system="be brief",
        messages=[{"role": "user", "content": [{"type": "text", "text": "hi there"}]}],
    )
    assert answer.content[0].type == "text" and answer.content[0].text == "sim: hi there"
    assert answer.stop_reason == "end_turn"
    assert (answer.usage.input_tokens, answer.usage.output_tokens) == (4, 3)
    cut = await claude.messages.create(
        model="claude-test", max_tokens=2, messages=[{"role": "user", "content": "a b c"}]
    )
    assert cut.content[0].type == "text" and cut.content[0].text == "sim: a"
    assert cut.stop_reason == "max_tokens"


async def test_azure_path_uses_the_deployment_as_model(sim: Simulator) -> None:
    client = openai.AsyncAzureOpenAI(
        api_key="k",
        azure_endpoint=sim.azure_endpoint,
        azure_deployment="my-deployment",
        api_version="2024-10-21",
        max_retries=0,
    )
    try:
        answer = await client.chat.completions.create(
            model="ignored", messages=[{"role": "user", "content": "azure"}]
        )
    finally:
        await client.close()
    assert answer.model == "my-deployment"
    assert answer.choices[0].message.content == "sim: azure"


async def test_latency_and_token_speed_delay_the_answer(
    sim: Simulator, oai: openai.AsyncOpenAI
) -> None:
    sim.config.latency_s = 0.2
    sim.config.tokens_per_s = 20  # 4 tokens: another 0.2 s
    started = time.monotonic()
    assert await ask(oai, "slow answer here") == "sim: slow answer here"
    assert time.monotonic() - started >= 0.4


# --- streaming --------------------------------------------------------------------------------


async def test_openai_stream_with_usage(oai: openai.AsyncOpenAI) -> None:
    stream = await oai.chat.completions.create(
        model="gpt-test",
        messages=[{"role": "user", "content": "stream me please"}],
        stream=True,
        stream_options={"include_usage": True},
    )
    text, finish, usage = "", None, None
    async for chunk in stream:
        if chunk.choices:
            text += chunk.choices[0].delta.content or ""
            finish = chunk.choices[0].finish_reason or finish
        usage = chunk.usage or usage
    assert text == "sim: stream me please"
    assert finish == "stop"
    assert usage is not None and (usage.prompt_tokens, usage.completion_tokens) == (3, 4)


async def test_anthropic_stream(claude: anthropic.AsyncAnthropic) -> None:
    async with claude.messages.stream(
        model="claude-test", max_tokens=3, messages=[{"role": "user", "content": "a b c d"}]
    ) as stream:
        pieces = [text async for text in stream.text_stream]
        final = await stream.get_final_message()
    assert "".join(pieces) == "sim: a b"
    assert final.stop_reason == "max_tokens"
    assert final.usage.output_tokens == 3


# --- scripted faults --------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("step", "error", "status"),
    [
        ("500", openai.InternalServerError, 500),
        ("502", openai.InternalServerError, 502),
        ("503", openai.InternalServerError, 503),
        ("400", openai.BadRequestError, 400),
        ("401", openai.AuthenticationError, 401),
        ("403", openai.PermissionDeniedError, 403),
    ],
)
async def test_openai_status_steps(
    oai: openai.AsyncOpenAI, step: str, error: type[openai.APIStatusError], status: int
) -> None:
    with pytest.raises(error) as info:
        await ask(oai, f"fail [[sim:{step}:{step}]]")
    assert info.value.status_code == status
    assert isinstance(info.value.body, dict) and "simulated" in info.value.body["message"]


@pytest.mark.parametrize(
    ("step", "retry_after", "retry_after_ms"),
    [("429", "1", "1000"), ("429@2.5", "3", "2500"), ("429-", None, None)],
)
async def test_openai_rate_limit_steps(
    oai: openai.AsyncOpenAI, step: str, retry_after: str | None, retry_after_ms: str | None
) -> None:
    with pytest.raises(openai.RateLimitError) as info:
        await ask(oai, f"[[sim:k:{step}]] limited")
    headers = info.value.response.headers
    assert headers.get("retry-after") == retry_after
    assert headers.get("retry-after-ms") == retry_after_ms
    assert info.value.code == "rate_limit_exceeded"


@pytest.mark.parametrize(
    ("step", "code"), [("ctx", "context_length_exceeded"), ("filter", "content_filter")]
)
async def test_openai_rejection_codes(oai: openai.AsyncOpenAI, step: str, code: str) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await ask(oai, f"[[sim:{step}:{step}]]")
    assert info.value.code == code
    assert info.value.type == "invalid_request_error"


async def test_hang_times_out_and_is_released(sim: Simulator, oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APITimeoutError):
        await ask(oai, "[[sim:h:hang]]", client_timeout=0.3)
    # The client went away, so the simulator cancels the hung handler.
    for _ in range(100):
        if sim.stats.in_flight == 0:
            break
        await asyncio.sleep(0.01)
    assert sim.stats.in_flight == 0
    assert sim.stats.by_key == {"h": 1}


async def test_hang_for_seconds_then_answers(oai: openai.AsyncOpenAI) -> None:
    started = time.monotonic()
    assert await ask(oai, "late [[sim:h:hang@0.3]]") == "sim: late"
    assert time.monotonic() - started >= 0.3


async def test_reset_closes_the_connection(sim: Simulator, oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.APIConnectionError) as info:
        await ask(oai, "[[sim:r:reset]]")
    assert not isinstance(info.value, openai.APITimeoutError)
    assert sim.stats.resets == 1
    assert await ask(oai, "still serving") == "sim: still serving"


async def test_malformed_body(oai: openai.AsyncOpenAI, claude: anthropic.AsyncAnthropic) -> None:
    # Both SDKs let the JSON decoder's error escape for a 200 whose body is not JSON.
    with pytest.raises(json.JSONDecodeError):
        await ask(oai, "[[sim:m:malformed]]")
    with pytest.raises(json.JSONDecodeError):
        await claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "[[sim:m2:malformed]]"}]
        )


async def test_steps_advance_per_key_and_last_repeats(
    sim: Simulator, oai: openai.AsyncOpenAI
) -> None:
    prompt = "retry me [[sim:job-1:503,429,ok]]"
    with pytest.raises(openai.InternalServerError):
        await ask(oai, prompt)
    with pytest.raises(openai.RateLimitError):
        await ask(oai, prompt)
    assert await ask(oai, prompt) == "sim: retry me"
    assert await ask(oai, prompt) == "sim: retry me"
    assert sim.stats.by_key == {"job-1": 4}
    assert sim.stats.by_status == {503: 1, 429: 1, 200: 2}
    assert sim.stats.rate_limited == 1


async def test_unknown_step_is_a_bad_request(oai: openai.AsyncOpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as info:
        await ask(oai, "[[sim:k:explode]]")
    assert "explode" in info.value.message


async def test_anthropic_error_format(claude: anthropic.AsyncAnthropic) -> None:
    async def fail(step: str) -> anthropic.APIStatusError:
        with pytest.raises(anthropic.APIStatusError) as info:
            await claude.messages.create(
                model="c",
                max_tokens=5,
                messages=[{"role": "user", "content": f"[[sim:{step}:{step}]]"}],
            )
        return info.value

    limited = await fail("429")
    assert isinstance(limited, anthropic.RateLimitError)
    assert limited.body == {
        "type": "error",
        "error": {"type": "rate_limit_error", "message": "Rate limit reached (simulated)"},
    }
    assert limited.response.headers["retry-after"] == "1"
    assert isinstance(await fail("529"), anthropic.OverloadedError)
    server = await fail("500")
    assert isinstance(server, anthropic.InternalServerError)
    assert isinstance(server.body, dict) and server.body["error"]["type"] == "api_error"
    too_long = await fail("ctx")
    assert isinstance(too_long, anthropic.BadRequestError)
    assert "prompt is too long" in too_long.message
    with pytest.raises(anthropic.APIConnectionError):
        await claude.messages.create(
            model="c", max_tokens=5, messages=[{"role": "user", "content": "[[sim:r:reset]]"}]
        )


def test_parse_steps() -> None:
    steps = parse_steps("ok, 500,429@2,429-,hang@0.5,hang,malformed,ctx,filter,reset")
    assert [s.kind for s in steps] == [
        StepKind.OK,
        StepKind.STATUS,
        StepKind.RATE_LIMITED,
        StepKind.RATE_LIMITED,
        StepKind.HANG,
        StepKind.HANG,
        StepKind.MALFORMED,
        StepKind.CONTEXT,
        StepKind.FILTER,
        StepKind.RESET,
    ]
    assert (steps[1].status, steps[2].seconds, steps[3].retry_after_header) == (500, 2.0, False)
    assert (steps[4].seconds, steps[5].seconds) == (0.5, 3600.0)
    for bad in ("200", "boom", "hang@x", ""):
        with pytest.raises(ScriptError):
            parse_steps(bad)


# --- rate limits ------------------------------------------------------------------------------


async def test_rpm_limit_answers_429_after_n_requests(
    sim: Simulator, oai: openai.AsyncOpenAI
) -> None:
    sim.config.rpm = 3
    for n in range(3):
        raw = await oai.chat.completions.with_raw_response.create(
            model="m", messages=[{"role": "user", "content": "hi"}]
        )
        assert raw.headers["x-ratelimit-limit-requests"] == "3"
        assert raw.headers["x-ratelimit-remaining-requests"] == str(2 - n)
    with pytest.raises(openai.RateLimitError) as info:
        await ask(oai, "one too many")
    assert 59 <= int(info.value.response.headers["retry-after"]) <= 60
    assert sim.stats.throttled == 1 and sim.stats.by_status == {200: 3, 429: 1}
    sim.reset()
    assert await ask(oai, "after reset") == "sim: after reset"
    assert sim.stats.requests == 1


async def test_tpm_limit_counts_prompt_and_max_tokens(
    sim: Simulator, oai: openai.AsyncOpenAI
) -> None:
    sim.config.tpm = 30
    # Each request costs 2 prompt words + 10 max_tokens = 12: two fit in 30, the third does not.
    for _ in range(2):
        await ask(oai, "two words", max_tokens=10)
    with pytest.raises(openai.RateLimitError) as info:
        await ask(oai, "two words", max_tokens=10)
    assert info.value.response.headers["x-ratelimit-remaining-tokens"] == "6"
    assert "tokens" in info.value.message


def test_sliding_window_frees_budget_as_entries_expire() -> None:
    window = SlidingWindow()
    assert window.admit(0.0, 10, 0, RateLimits(rpm=2)).retry_after is None
    assert window.admit(20.0, 10, 0, RateLimits(rpm=2)).retry_after is None
    refused = window.admit(30.0, 10, 0, RateLimits(rpm=2))
    assert refused.retry_after == pytest.approx(30.0)  # the entry at t=0 expires at t=60
    assert refused.headers["x-ratelimit-reset-requests"] == "50s"
    assert window.admit(60.5, 10, 0, RateLimits(rpm=2)).retry_after is None
    tokens = SlidingWindow()
    tokens.admit(0.0, 40, 0, RateLimits(tpm=100))
    tokens.admit(10.0, 40, 0, RateLimits(tpm=100))
    # 80 used; 50 more needs the first 40 freed (at t=60).
    assert tokens.admit(15.0, 50, 0, RateLimits(tpm=100)).retry_after == pytest.approx(45.0)
    assert tokens.admit(15.0, 20, 0, RateLimits(tpm=100)).retry_after is None


def test_format_reset() -> None:
    assert [format_reset(s) for s in (0.006, 0.9994, 1.0, 1.5, 60.0, 61.25)] == [
        "6ms",
        "999ms",
        "1s",
        "1.5s",
        "1m0s",
        "1m1.25s",
    ]


# --- the simulator as a process ---------------------------------------------------------------


@pytest.fixture
def sim_process() -> Iterator[SimulatorProcess]:
    process = SimulatorProcess("--rpm", "2", "--retry-after", "2")
    process.start()
    yield process
    assert process.stop() == 0


async def test_subprocess_answers_and_reports_stats(sim_process: SimulatorProcess) -> None:
    assert sim_process.url.startswith("http://127.0.0.1:")
    client = openai.AsyncOpenAI(api_key="k", base_url=sim_process.base_url, max_retries=0)
    try:
        assert await ask(client, "across processes [[sim:p:ok]]") == "sim: across processes"
        with pytest.raises(openai.RateLimitError):
            await ask(client, "x [[sim:p:429]]")  # a scripted 429 consumes budget too
        with pytest.raises(openai.RateLimitError):
            await ask(client, "over the rpm budget")
    finally:
        await client.close()
    async with httpx.AsyncClient(base_url=sim_process.url) as admin:
        stats = (await admin.get("/_sim/stats")).json()
        assert stats["requests"] == 3
        assert stats["by_status"] == {"200": 1, "429": 2}
        assert stats["by_key"] == {"p": 2}
        assert (stats["throttled"], stats["rate_limited"]) == (1, 2)
        assert (await admin.post("/_sim/reset")).status_code == 200
        assert (await admin.get("/_sim/stats")).json()["requests"] == 0
        changed = await admin.post("/_sim/config", json={"latency_s": 0.1, "rpm": None})
        assert changed.json()["latency_s"] == 0.1 and changed.json()["rpm"] is None
        for bad in ({"nope": 1}, {"rpm": "many"}, {"latency_s": None}, [1]):
            assert (await admin.post("/_sim/config", json=bad)).status_code == 400
