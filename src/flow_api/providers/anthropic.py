"""Anthropic's Messages API, through `langchain_anthropic.ChatAnthropic`."""

from __future__ import annotations

import contextvars
from collections.abc import AsyncIterator
from typing import Any

import anthropic
from langchain_anthropic import ChatAnthropic
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult

from flow_api.errors import ProviderError
from flow_api.providers.base import Provider
from flow_api.providers.ratelimit_headers import RATELIMIT_FIELD, ratelimit_headers
from flow_api.providers.sdk_errors import map_sdk_error
from flow_api.settings import AnthropicSettings


class AnthropicProvider(Provider):
    name = "anthropic"

    def __init__(self, settings: AnthropicSettings, client_timeout_s: float) -> None:
        super().__init__(settings.model, settings.models)
        self.settings = settings
        self.client_timeout_s = client_timeout_s  # see `registry.client_timeout_s`

    def build(self, model: str) -> BaseChatModel:
        kwargs = {"base_url": self.settings.base_url} if self.settings.base_url else {}
        return HeaderedChatAnthropic(
            model_name=model,
            api_key=self.settings.api_key or anthropic_missing_key(),
            max_retries=0,
            default_request_timeout=self.client_timeout_s,
            max_tokens=self.settings.default_max_tokens,
            **kwargs,
        )

    def map_error(self, exc: BaseException) -> ProviderError | None:
        return map_sdk_error(exc, anthropic)


def anthropic_missing_key() -> str:
    # The registry only builds this provider when a key is set; this keeps mypy and users honest.
    raise ValueError("ANTHROPIC_API_KEY is not set")


# The raw answer (with its headers) is only seen in `_acreate`, the result only in `_agenerate`:
# a context variable carries the headers from one to the other within the same call's task.
_captured: contextvars.ContextVar[dict[str, str] | None] = contextvars.ContextVar(
    "anthropic_ratelimit", default=None
)


class HeaderedChatAnthropic(ChatAnthropic):
    """`ChatAnthropic` that copies the `anthropic-ratelimit-*` headers into the message's
    `response_metadata["ratelimit"]`, where the worker's rate budget reads them."""

    async def _acreate(self, payload: dict[str, Any]) -> Any:
        raw = await super()._acreate(payload)
        holder = _captured.get()
        if holder is not None:
            holder.update(ratelimit_headers(getattr(raw, "headers", None)))
        return raw

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        holder: dict[str, str] = {}
        token = _captured.set(holder)
        try:
            result = await super()._agenerate(
                messages, stop=stop, run_manager=run_manager, **kwargs
            )
        finally:
            _captured.reset(token)
        if holder and result.generations:
            result.generations[0].message.response_metadata[RATELIMIT_FIELD] = holder
        return result

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """Streamed: the headers go with the first chunk (they are known before it)."""
        holder: dict[str, str] = {}
        token = _captured.set(holder)
        try:
            first = True
            async for chunk in super()._astream(
                messages, stop=stop, run_manager=run_manager, **kwargs
            ):
                if first and holder:
                    chunk.message.response_metadata[RATELIMIT_FIELD] = dict(holder)
                first = False
                yield chunk
        finally:
            _captured.reset(token)
