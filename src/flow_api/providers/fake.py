"""A deterministic LangChain chat model for development and tests (only when explicitly enabled).

It answers `echo: <last human message>`, counts one token per whitespace-separated word, honours
`max_tokens` (finish reason `length`) and `stop`. No network, no randomness.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage, HumanMessage
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult

from flow_api.providers.base import Provider


class EchoChatModel(BaseChatModel):
    """Echoes the prompt back; usage counts words."""

    model_name: str = "echo"

    @property
    def _llm_type(self) -> str:
        return "flow-echo"

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        prompt = next(
            (str(m.content) for m in reversed(messages) if isinstance(m, HumanMessage)), ""
        )
        words = f"echo: {prompt}".split()
        max_tokens = kwargs.get("max_tokens")
        finish = "stop"
        if isinstance(max_tokens, int) and len(words) > max_tokens:
            words, finish = words[:max_tokens], "length"
        text = " ".join(words)
        for marker in stop or ():
            if marker in text:
                text = text.split(marker, 1)[0]
        prompt_tokens = sum(len(str(m.content).split()) for m in messages)
        usage = UsageMetadata(
            input_tokens=prompt_tokens,
            output_tokens=len(text.split()),
            total_tokens=prompt_tokens + len(text.split()),
        )
        message = AIMessage(
            content=text,
            usage_metadata=usage,
            response_metadata={"finish_reason": finish, "model_name": self.model_name},
        )
        return ChatResult(generations=[ChatGeneration(message=message)])

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        return self._generate(messages, stop=stop, **kwargs)

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """The same answer, a word a chunk, then a last chunk with usage and finish reason."""
        message = self._generate(messages, stop=stop, **kwargs).generations[0].message
        text = str(message.content)
        for index, word in enumerate(text.split(" ")):
            piece = word if index == 0 else " " + word
            chunk = ChatGenerationChunk(message=AIMessageChunk(content=piece))
            if run_manager is not None:
                await run_manager.on_llm_new_token(piece, chunk=chunk)
            yield chunk
        last = AIMessageChunk(
            content="",
            usage_metadata=getattr(message, "usage_metadata", None),
            response_metadata=message.response_metadata,
            chunk_position="last",
        )
        yield ChatGenerationChunk(message=last)


class FakeProvider(Provider):
    name = "fake"

    def __init__(self) -> None:
        super().__init__("echo")

    def build(self, model: str) -> BaseChatModel:
        return EchoChatModel(model_name=model)
