"""The LangChain pipeline every job runs: prompt template -> chat model -> parser, with usage."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from langchain_core.language_models import BaseChatModel
from langchain_core.messages import AIMessage, AIMessageChunk, BaseMessage
from langchain_core.output_parsers import StrOutputParser
from langchain_core.outputs import ChatGeneration
from langchain_core.prompts import ChatPromptTemplate

from flow_api.errors import FlowError, ProviderError
from flow_api.models import GenerateRequest, Generation, Usage
from flow_api.providers.base import Provider

_WITH_SYSTEM = ChatPromptTemplate.from_messages([("system", "{system}"), ("human", "{prompt}")])
_PROMPT_ONLY = ChatPromptTemplate.from_messages([("human", "{prompt}")])
_PARSER = StrOutputParser()


async def generate(
    provider: Provider,
    model: str,
    request: GenerateRequest,
    *,
    observe: Callable[[dict[str, Any]], None] | None = None,
    on_token: Callable[[str], None] | None = None,
) -> Generation:
    """Run one request on `provider`/`model`; SDK errors come out as domain `ProviderError`s.

    `observe`, if given, sees the answer's `response_metadata` (the rate budget reads the
    provider's rate-limit headers there). `on_token`, if given, receives the answer's text as
    the provider produces it (the call is streamed); the result is the same either way.
    """
    options = request.options
    template = _WITH_SYSTEM if options.system else _PROMPT_ONLY
    # The same template -> model -> parser pipeline, run step by step rather than as
    # `(template | chat.bind(...)).ainvoke(...)`: composing a sequence and a binding per call and
    # running three steps through LangChain's runnable machinery (config, callback managers) cost
    # more CPU than the model call's own client code at 1000 calls in flight.
    messages = template.format_messages(system=options.system or "", prompt=request.prompt)
    chat = provider.chat_model(model)
    try:
        kwargs = provider.call_options(options)
        if on_token is None:
            message: BaseMessage = await chat.ainvoke(messages, **kwargs)
        else:
            message = await _streamed(chat, messages, kwargs, on_token)
    except FlowError:
        raise
    except Exception as exc:
        mapped = provider.map_error(exc)
        if mapped is None:
            raise ProviderError(
                f"unexpected provider failure: {type(exc).__name__}: {str(exc)[:300]}"
            ) from exc
        raise mapped from exc
    if observe is not None:
        observe(message.response_metadata)
    return Generation(
        text=_PARSER.parse_result([ChatGeneration(message=message)]),
        provider=provider.name,
        model=model,
        usage=usage_of(message),
        finish_reason=finish_reason_of(message),
    )


async def _streamed(
    chat: BaseChatModel,
    messages: list[BaseMessage],
    kwargs: dict[str, Any],
    on_token: Callable[[str], None],
) -> BaseMessage:
    """The answer of a streamed call, its chunks added up (text, usage, metadata), each chunk's
    text handed to `on_token` on the way. Through LangChain's `astream`, so any chat model
    works: one without streaming support answers in one chunk."""
    total: BaseMessage | None = None
    async for chunk in chat.astream(messages, **kwargs):
        text = chunk.text
        if text:
            on_token(text)
        # A model without streaming answers one whole message (not a chunk): that is the answer.
        if isinstance(chunk, AIMessageChunk) and isinstance(total, AIMessageChunk):
            total = total + chunk
        else:
            total = chunk
    if total is None:
        raise ProviderError("the provider's stream ended without an answer")
    return total


def usage_of(message: Any) -> Usage:
    meta = message.usage_metadata if isinstance(message, AIMessage) else None
    if not meta:
        return Usage()
    prompt = int(meta.get("input_tokens", 0))
    completion = int(meta.get("output_tokens", 0))
    return Usage(
        prompt_tokens=prompt,
        completion_tokens=completion,
        total_tokens=int(meta.get("total_tokens", prompt + completion)),
    )


def finish_reason_of(message: Any) -> str | None:
    meta = getattr(message, "response_metadata", None) or {}
    reason = meta.get("finish_reason") or meta.get("stop_reason")
    return str(reason) if reason else None
