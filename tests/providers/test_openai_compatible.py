"""Our OpenAI-compatible chat model against the simulator over real HTTP: what `ChatOpenAI` gave
the worker (usage, finish reason, the rate-limit headers) on plain and streamed answers, token
callbacks on the streaming path, and the options reaching the wire."""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any
from uuid import UUID

import pytest
from langchain_core.callbacks import AsyncCallbackHandler
from langchain_core.messages import AIMessage, AIMessageChunk, HumanMessage, SystemMessage

from flow_api.providers.openai import OpenAIProvider
from flow_api.providers.openai_compatible import OpenAICompatibleChat
from flow_api.providers.ratelimit_headers import RATELIMIT_FIELD
from flow_api.settings import OpenAISettings
from flow_api.testing import Simulator


@pytest.fixture
async def provider(simulator: Simulator) -> AsyncIterator[OpenAIProvider]:
    simulator.config.rpm, simulator.config.tpm = 600, 90_000
    built = OpenAIProvider(OpenAISettings(api_key="sk-test", base_url=simulator.base_url), 10)
    yield built
    await built.aclose()


def chat(provider: OpenAIProvider) -> OpenAICompatibleChat:
    model = provider.chat_model("gpt-sim")
    assert isinstance(model, OpenAICompatibleChat)
    return model


class Tokens(AsyncCallbackHandler):
    def __init__(self) -> None:
        self.tokens: list[str] = []

    async def on_llm_new_token(self, token: str, *, run_id: UUID, **kwargs: Any) -> None:
        self.tokens.append(token)


async def test_an_answer_carries_usage_finish_reason_and_rate_limit_headers(
    provider: OpenAIProvider, simulator: Simulator
) -> None:
    answer = await chat(provider).ainvoke(
        [SystemMessage("be brief"), HumanMessage("one two three four")],
        max_tokens=3,
        temperature=0.5,
        seed=7,
    )
    assert isinstance(answer, AIMessage)
    assert answer.content == "sim: one two"
    assert answer.usage_metadata is not None
    assert answer.usage_metadata["output_tokens"] == 3
    usage = answer.usage_metadata
    assert usage["total_tokens"] == usage["input_tokens"] + usage["output_tokens"]
    assert answer.response_metadata["finish_reason"] == "length"
    limits = answer.response_metadata[RATELIMIT_FIELD]
    assert limits["x-ratelimit-limit-requests"] == "600"
    assert limits["x-ratelimit-limit-tokens"] == "90000"
    sent = simulator.bodies[-1]
    assert sent["messages"] == [
        {"role": "system", "content": "be brief"},
        {"role": "user", "content": "one two three four"},
    ]
    assert (sent["max_completion_tokens"], sent["temperature"], sent["seed"]) == (3, 0.5, 7)


async def test_a_stream_yields_tokens_usage_and_headers(provider: OpenAIProvider) -> None:
    tokens = Tokens()
    merged: AIMessageChunk | None = None
    chunks = 0
    async for chunk in chat(provider).astream(
        [HumanMessage("alpha beta gamma")], config={"callbacks": [tokens]}
    ):
        assert isinstance(chunk, AIMessageChunk)
        merged = chunk if merged is None else merged + chunk
        chunks += 1
    assert merged is not None and chunks > 2
    assert merged.content == "sim: alpha beta gamma"
    assert "".join(tokens.tokens) == "sim: alpha beta gamma"
    assert merged.usage_metadata is not None and merged.usage_metadata["output_tokens"] == 4
    assert merged.response_metadata["finish_reason"] == "stop"
    assert merged.response_metadata[RATELIMIT_FIELD]["x-ratelimit-limit-requests"] == "600"


def test_sync_calls_are_refused_with_the_reason(provider: OpenAIProvider) -> None:
    with pytest.raises(NotImplementedError, match="async only"):
        chat(provider).invoke([HumanMessage("hi")])
