"""A scripted LangChain chat model: the LLM boundary, the only fake in the suite."""

from __future__ import annotations

import asyncio
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, BaseMessage
from langchain_core.outputs import ChatGeneration, ChatResult

from flow_api.errors import FlowError
from flow_api.providers.base import Provider

Step = FlowError | float | None  # an error to raise, seconds to hang, or None for success


class ScriptedChatModel(BaseChatModel):
    """Answers each prompt by its script: the n-th call for a prompt takes the n-th step."""

    scripts: dict[str, list[Any]]
    calls: dict[str, int]
    aborted: list[str]

    @property
    def _llm_type(self) -> str:
        return "scripted"

    def _generate(self, messages: list[BaseMessage], *a: Any, **k: Any) -> ChatResult:
        raise NotImplementedError

    async def _agenerate(self, messages: list[BaseMessage], *a: Any, **k: Any) -> ChatResult:
        prompt = str(messages[-1].content)
        n = self.calls.get(prompt, 0)
        self.calls[prompt] = n + 1
        script = self.scripts.get(prompt, [None])
        step = script[min(n, len(script) - 1)]
        if isinstance(step, FlowError):
            raise step
        if isinstance(step, float):
            try:
                await asyncio.sleep(step)
            except asyncio.CancelledError:
                self.aborted.append(prompt)
                raise
        message = AIMessage(
            content=f"ok {n + 1}",
            usage_metadata={"input_tokens": 1, "output_tokens": 2, "total_tokens": 3},
            response_metadata={"finish_reason": "stop"},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])


class ScriptedProvider(Provider):
    name = "fake"

    def __init__(self, scripts: dict[str, list[Any]]) -> None:
        super().__init__("scripted")
        self.model = ScriptedChatModel(scripts=scripts, calls={}, aborted=[])

    def build(self, model: str) -> BaseChatModel:
        return self.model
