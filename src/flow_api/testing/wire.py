"""The OpenAI and Anthropic wire formats the simulator reads and writes.

Token counting is deliberately crude and cheap: one token per whitespace-separated word.
"""

from __future__ import annotations

import enum
import time
from dataclasses import dataclass
from typing import Any

import orjson

from flow_api.testing.script import Marker, ScriptError, find_marker, strip_markers

DEFAULT_COST_TOKENS = 16  # the completion budget charged to the limiter when none is asked for
CONTEXT_WINDOW = 128_000
ANTHROPIC_CONTEXT_WINDOW = 200_000


class Api(enum.Enum):
    """Which provider's dialect a request speaks."""

    OPENAI = "openai"
    ANTHROPIC = "anthropic"


class BadRequest(ValueError):
    """The request body is not a chat request the simulator understands."""


@dataclass(slots=True)
class Chat:
    """What the simulator needs from one chat request."""

    api: Api
    model: str
    prompt: str  # the last user message, markers stripped
    prompt_tokens: int
    max_tokens: int | None
    stream: bool
    include_usage: bool
    marker: Marker | None

    @property
    def cost(self) -> int:
        """Tokens charged to the per-minute token budget."""
        budget = self.max_tokens if self.max_tokens is not None else DEFAULT_COST_TOKENS
        return self.prompt_tokens + budget


@dataclass(slots=True)
class Answer:
    """The deterministic answer: `"sim: " + prompt`, cut to `max_tokens` words."""

    text: str
    tokens: int
    truncated: bool


def words(text: str) -> int:
    """The simulator's token count: whitespace-separated words."""
    return len(text.split())


def text_of(content: Any) -> str:
    """The text of a message's `content`: a string or a list of text parts/blocks."""
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        return "\n".join(
            part["text"]
            for part in content
            if isinstance(part, dict) and isinstance(part.get("text"), str)
        )
    return ""


def parse_chat(api: Api, body: Any, model: str | None = None) -> Chat:
    """Read an OpenAI chat-completions or Anthropic messages body; `model` overrides (Azure)."""
    if not isinstance(body, dict) or not isinstance(body.get("messages"), list):
        raise BadRequest("the body must be a JSON object with a 'messages' list")
    texts = [text_of(m.get("content")) for m in body["messages"] if isinstance(m, dict)]
    system = text_of(body.get("system")) if api is Api.ANTHROPIC else ""
    last_user = next(
        (
            text
            for m, text in zip(reversed(body["messages"]), reversed(texts), strict=False)
            if isinstance(m, dict) and m.get("role") == "user"
        ),
        "",
    )
    try:
        marker = find_marker(last_user) or find_marker(system) or _marker_anywhere(texts)
    except ScriptError as exc:
        raise BadRequest(str(exc)) from None
    max_tokens = body.get("max_completion_tokens", body.get("max_tokens"))
    options = body.get("stream_options")
    return Chat(
        api=api,
        model=model or str(body.get("model") or "sim"),
        prompt=strip_markers(last_user),
        prompt_tokens=sum(map(words, texts)) + words(system),
        max_tokens=max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else None,
        stream=body.get("stream") is True,
        include_usage=isinstance(options, dict) and options.get("include_usage") is True,
        marker=marker,
    )


def _marker_anywhere(texts: list[str]) -> Marker | None:
    for text in reversed(texts):
        found = find_marker(text)
        if found is not None:
            return found
    return None


def answer(chat: Chat) -> Answer:
    """The deterministic answer to `chat`."""
    text = "sim: " + chat.prompt
    parts = text.split()
    if chat.max_tokens is not None and len(parts) > chat.max_tokens:
        return Answer(" ".join(parts[: chat.max_tokens]), chat.max_tokens, True)
    return Answer(text, len(parts), False)


# --- non-streaming answers --------------------------------------------------------------------


def completion(chat: Chat, ans: Answer, request_id: str) -> bytes:
    """The full JSON answer in `chat.api`'s format."""
    if chat.api is Api.OPENAI:
        return orjson.dumps(
            {
                "id": f"chatcmpl-{request_id}",
                "object": "chat.completion",
                "created": int(time.time()),
                "model": chat.model,
                "choices": [
                    {
                        "index": 0,
                        "message": {"role": "assistant", "content": ans.text, "refusal": None},
                        "logprobs": None,
                        "finish_reason": "length" if ans.truncated else "stop",
                    }
                ],
                "usage": {
                    "prompt_tokens": chat.prompt_tokens,
                    "completion_tokens": ans.tokens,
                    "total_tokens": chat.prompt_tokens + ans.tokens,
                },
                "system_fingerprint": None,
            }
        )
    return orjson.dumps(
        {
            "id": f"msg_{request_id}",
            "type": "message",
            "role": "assistant",
            "model": chat.model,
            "content": [{"type": "text", "text": ans.text}],
            "stop_reason": "max_tokens" if ans.truncated else "end_turn",
            "stop_sequence": None,
            "usage": {"input_tokens": chat.prompt_tokens, "output_tokens": ans.tokens},
        }
    )


# --- errors -----------------------------------------------------------------------------------

_OPENAI_TYPES = {
    400: "invalid_request_error",
    401: "invalid_request_error",
    403: "permission_error",
    404: "invalid_request_error",
    429: "requests",
}
_OPENAI_CODES = {401: "invalid_api_key", 404: "model_not_found", 429: "rate_limit_exceeded"}
_ANTHROPIC_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    413: "request_too_large",
    429: "rate_limit_error",
    529: "overloaded_error",
}


def error_body(
    api: Api, status: int, message: str, *, code: str | None = None, kind: str | None = None
) -> bytes:
    """The provider's error JSON for `status`: `code` and `kind` (the error type) override."""
    if api is Api.OPENAI:
        default_type = "server_error" if status >= 500 else "invalid_request_error"
        return orjson.dumps(
            {
                "error": {
                    "message": message,
                    "type": kind or _OPENAI_TYPES.get(status, default_type),
                    "param": None,
                    "code": code or _OPENAI_CODES.get(status),
                }
            }
        )
    default_type = "api_error" if status >= 500 else "invalid_request_error"
    return orjson.dumps(
        {
            "type": "error",
            "error": {"type": _ANTHROPIC_TYPES.get(status, default_type), "message": message},
        }
    )


def context_error(chat: Chat) -> bytes:
    """A too-long prompt, worded as each provider words it (Anthropic has no error code)."""
    if chat.api is Api.OPENAI:
        message = (
            f"This model's maximum context length is {CONTEXT_WINDOW} tokens. However, your "
            f"messages resulted in {CONTEXT_WINDOW + chat.prompt_tokens} tokens. "
            "Please reduce the length of the messages."
        )
        return error_body(chat.api, 400, message, code="context_length_exceeded")
    window = ANTHROPIC_CONTEXT_WINDOW
    message = f"prompt is too long: {window + chat.prompt_tokens} tokens > {window} maximum"
    return error_body(chat.api, 400, message)


def filter_error(chat: Chat) -> bytes:
    """A content-filter refusal (Azure OpenAI's `content_filter` code)."""
    message = (
        "The response was filtered due to the prompt triggering the content management policy."
    )
    return error_body(chat.api, 400, message, code="content_filter")
