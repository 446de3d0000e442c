"""`ChatOpenAI` / `AzureChatOpenAI` without a thread hop per call, and with the rate-limit headers.

Why: langchain-openai's `_agenerate` builds the `ChatResult` with
`run_in_executor(None, self._create_chat_result, ...)`. For chat-sized answers that work takes
well under a millisecond, but the hop to a thread and back (two wake-ups and a GIL hand-over
under load) cost more than the work itself: at 1000 calls in flight, a quarter of the worker's
samples were in executor threads. Here the plain chat-completions path builds the result inline;
everything else (structured output, the Responses API) goes to LangChain's own method unchanged.

The same path copies the provider's rate-limit headers (see `ratelimit_headers.py`) into the
message's `response_metadata` under `ratelimit`, where the worker's rate budget reads them.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Any

import openai
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun
from langchain_core.messages import BaseMessage
from langchain_core.outputs import ChatGenerationChunk, ChatResult
from langchain_openai import AzureChatOpenAI, ChatOpenAI
from langchain_openai.chat_models import base as lc_openai

from flow_api.providers.ratelimit_headers import RATELIMIT_FIELD, ratelimit_headers


class _InlineResult:
    """Mixin for a `BaseChatOpenAI` subclass: the plain chat path without `run_in_executor`."""

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        model: Any = self
        payload = model._get_request_payload(messages, stop=stop, **kwargs)
        if "response_format" in payload or model._use_responses_api(payload):
            result: ChatResult = await super()._agenerate(  # type: ignore[misc]
                messages, stop=stop, run_manager=run_manager, **kwargs
            )
            return result
        try:
            raw = await model.async_client.with_raw_response.create(**payload)
        except openai.BadRequestError as exc:
            lc_openai._handle_openai_bad_request(exc)  # raises LangChain's mapped error
            raise
        except openai.APIError as exc:
            lc_openai._handle_openai_api_error(exc)
            raise
        response = raw.parse()
        info: dict[str, Any] = {}
        limits = ratelimit_headers(raw.headers)
        if limits:
            info[RATELIMIT_FIELD] = limits
        built: ChatResult = model._create_chat_result(response, info)
        return built

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        """LangChain's stream, with only the rate-limit headers kept from the first chunk's
        `headers` (`include_response_headers` copies them all)."""
        chunks = super()._astream(messages, stop=stop, run_manager=run_manager, **kwargs)  # type: ignore[misc]
        async for chunk in chunks:
            info = chunk.generation_info
            if info and "headers" in info:
                limits = ratelimit_headers(info.pop("headers"))
                if limits:
                    info[RATELIMIT_FIELD] = limits
            yield chunk


class InlineChatOpenAI(_InlineResult, ChatOpenAI):
    """`ChatOpenAI` whose results are built on the event loop (see the module docstring)."""

    # Streamed calls (every job's, for `GET /api/ai/stream`) report usage and rate limits too.
    stream_usage: bool | None = True
    include_response_headers: bool = True


class InlineAzureChatOpenAI(_InlineResult, AzureChatOpenAI):
    """`AzureChatOpenAI` whose results are built on the event loop."""

    stream_usage: bool | None = True
    include_response_headers: bool = True
