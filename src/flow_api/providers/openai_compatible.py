"""A LangChain chat model for OpenAI-compatible chat completions: one pooled aiohttp session.

Why not `ChatOpenAI`: at 1000 calls in flight the worker spent more CPU in the SDK's and
LangChain-OpenAI's per-call machinery (an httpx request on an aiohttp transport, pydantic
response models, the payload builder's validation, header copies) than in everything else it
does for a job (`benchmarks/vs_node.py`, py-spy). This model speaks the same wire format
directly: one POST, one `orjson.loads`, the `AIMessage` built from the dict. It is a
`BaseChatModel`, so `ainvoke`/`astream`, callbacks and tracing work as for any LangChain model.

What it keeps from the `ChatOpenAI` path it replaces: usage metadata (`usage_metadata`), the
finish reason and model name in `response_metadata`, and the provider's rate-limit headers under
`response_metadata["ratelimit"]` (see `ratelimit_headers.py`; the rate budget reads them), on
plain and streamed answers alike. A non-2xx answer raises `ProviderHTTPError`, which
`sdk_errors.map_http_error` maps as it maps the SDKs' status errors.
"""

from __future__ import annotations

from collections.abc import AsyncIterator, Callable, Iterator, Mapping
from typing import Any

import aiohttp
import orjson
from langchain_core.callbacks import AsyncCallbackManagerForLLMRun, CallbackManagerForLLMRun
from langchain_core.language_models import BaseChatModel
from langchain_core.messages import (
    AIMessage,
    AIMessageChunk,
    BaseMessage,
    ChatMessage,
    HumanMessage,
    SystemMessage,
    ToolMessage,
)
from langchain_core.messages.ai import UsageMetadata
from langchain_core.outputs import ChatGeneration, ChatGenerationChunk, ChatResult
from pydantic import ConfigDict, SecretStr

from flow_api.providers.ratelimit_headers import RATELIMIT_FIELD, ratelimit_headers

SessionSource = Callable[[], aiohttp.ClientSession]
"""Gives the shared session (the provider owns it and closes it)."""

_ROLES: dict[type[BaseMessage], str] = {
    HumanMessage: "user",
    AIMessage: "assistant",
    SystemMessage: "system",
    ToolMessage: "tool",
}


class ProviderHTTPError(Exception):
    """A non-2xx answer: its status, the error `code` and `message` from the body, the headers."""

    def __init__(
        self, status: int, code: str | None, message: str, headers: Mapping[str, str]
    ) -> None:
        super().__init__(f"{status}: {message}")
        self.status = status
        self.code = code
        self.message = message
        self.headers = headers


class MalformedAnswer(Exception):
    """A 2xx answer whose body is not a chat completion."""


class OpenAICompatibleChat(BaseChatModel):
    """Chat completions (`POST {base_url}/chat/completions`) of any OpenAI-compatible endpoint.

    Per-call options (`temperature`, `max_tokens`, `stop`, `seed`, and any other body field)
    come as keyword arguments of `ainvoke`/`astream`, as with `ChatOpenAI`. Async only: the
    session lives on the worker's event loop.
    """

    model_config = ConfigDict(arbitrary_types_allowed=True)

    model_name: str
    base_url: str = "https://api.openai.com/v1"
    api_key: SecretStr | None = None
    session: SessionSource
    """The provider's pooled session (built on first use on the running loop)."""

    @property
    def _llm_type(self) -> str:
        return "openai-compatible-chat"

    @property
    def _identifying_params(self) -> dict[str, Any]:
        return {"model_name": self.model_name, "base_url": self.base_url}

    def _generate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        raise NotImplementedError("OpenAICompatibleChat is async only: use ainvoke or astream")

    def _stream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: CallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> Iterator[ChatGenerationChunk]:
        raise NotImplementedError("OpenAICompatibleChat is async only: use ainvoke or astream")

    async def _agenerate(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> ChatResult:
        body = self._payload(messages, stop, kwargs, stream=False)
        async with self._post(body) as answer:
            await _raise_for_status(answer)
            raw = await answer.read()
            limits = ratelimit_headers(answer.headers)
        try:
            return _chat_result(orjson.loads(raw), limits)
        except (KeyError, IndexError, TypeError, AttributeError) as exc:
            raise MalformedAnswer(f"not a chat completion: {type(exc).__name__}") from exc

    async def _astream(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None = None,
        run_manager: AsyncCallbackManagerForLLMRun | None = None,
        **kwargs: Any,
    ) -> AsyncIterator[ChatGenerationChunk]:
        body = self._payload(messages, stop, kwargs, stream=True)
        async with self._post(body) as answer:
            await _raise_for_status(answer)
            limits = ratelimit_headers(answer.headers)
            async for line in answer.content:
                if not line.startswith(b"data:"):
                    continue  # blank separators, comments, `event:` lines
                data = line[5:].strip()
                if data == b"[DONE]":
                    break
                try:
                    chunk = _stream_chunk(orjson.loads(data))
                except (KeyError, IndexError, TypeError, AttributeError) as exc:
                    raise MalformedAnswer(f"not a chat chunk: {type(exc).__name__}") from exc
                if chunk is None:
                    continue
                if limits:  # once, on the first chunk: merged chunks keep it
                    chunk.message.response_metadata[RATELIMIT_FIELD] = limits
                    limits = {}
                if run_manager is not None:
                    await run_manager.on_llm_new_token(chunk.text, chunk=chunk)
                yield chunk

    def _payload(
        self,
        messages: list[BaseMessage],
        stop: list[str] | None,
        options: dict[str, Any],
        *,
        stream: bool,
    ) -> dict[str, Any]:
        body: dict[str, Any] = {"model": self.model_name, "messages": _wire_messages(messages)}
        if stream:
            body["stream"] = True
            body["stream_options"] = {"include_usage": True}
        if stop:
            body["stop"] = stop
        for name, value in options.items():
            if value is None:
                continue
            # As `ChatOpenAI` sends it: `max_tokens` is deprecated for newer models.
            body["max_completion_tokens" if name == "max_tokens" else name] = value
        return body

    def _post(self, body: dict[str, Any]) -> Any:
        headers = {"Content-Type": "application/json", "Accept": "application/json"}
        if self.api_key is not None:
            headers["Authorization"] = f"Bearer {self.api_key.get_secret_value()}"
        return self.session().post(
            f"{self.base_url.rstrip('/')}/chat/completions",
            data=orjson.dumps(body),
            headers=headers,
        )


def _wire_messages(messages: list[BaseMessage]) -> list[dict[str, Any]]:
    wire: list[dict[str, Any]] = []
    for message in messages:
        role = message.role if isinstance(message, ChatMessage) else _ROLES.get(type(message))
        if role is None:
            raise ValueError(f"cannot send a {type(message).__name__} to a chat completion")
        entry: dict[str, Any] = {"role": role, "content": message.content}
        if isinstance(message, ToolMessage):
            entry["tool_call_id"] = message.tool_call_id
        wire.append(entry)
    return wire


async def _raise_for_status(answer: aiohttp.ClientResponse) -> None:
    if answer.status < 300:
        return
    raw = await answer.read()
    code: str | None = None
    message = raw[:500].decode(errors="replace")
    try:
        error = orjson.loads(raw).get("error")
    except (orjson.JSONDecodeError, AttributeError):
        error = None
    if isinstance(error, dict):
        code = error.get("code") if isinstance(error.get("code"), str) else None
        message = str(error.get("message") or message)
    raise ProviderHTTPError(answer.status, code, message, answer.headers)


def _usage(usage: dict[str, Any] | None) -> UsageMetadata | None:
    if not usage:
        return None
    prompt = int(usage.get("prompt_tokens") or 0)
    completion = int(usage.get("completion_tokens") or 0)
    return UsageMetadata(
        input_tokens=prompt,
        output_tokens=completion,
        total_tokens=int(usage.get("total_tokens") or prompt + completion),
    )


def _chat_result(body: dict[str, Any], limits: dict[str, str]) -> ChatResult:
    choice = body["choices"][0]
    finish = choice.get("finish_reason")
    metadata: dict[str, Any] = {"model_name": body.get("model"), "finish_reason": finish}
    if limits:
        metadata[RATELIMIT_FIELD] = limits
    message = AIMessage(
        content=choice["message"].get("content") or "",
        id=body.get("id"),
        usage_metadata=_usage(body.get("usage")),
        response_metadata=metadata,
    )
    return ChatResult(
        generations=[ChatGeneration(message=message, generation_info={"finish_reason": finish})],
        llm_output={"model_name": body.get("model"), "token_usage": body.get("usage")},
    )


def _stream_chunk(event: dict[str, Any]) -> ChatGenerationChunk | None:
    choices = event.get("choices") or []
    usage = _usage(event.get("usage"))
    if not choices and usage is None:
        return None
    metadata: dict[str, Any] = {}
    content = ""
    info: dict[str, Any] | None = None
    if choices:
        delta = choices[0].get("delta") or {}
        content = delta.get("content") or ""
        finish = choices[0].get("finish_reason")
        if finish:
            metadata = {"finish_reason": finish, "model_name": event.get("model")}
            info = {"finish_reason": finish}
    message = AIMessageChunk(
        content=content, id=event.get("id"), usage_metadata=usage, response_metadata=metadata
    )
    return ChatGenerationChunk(message=message, generation_info=info)
