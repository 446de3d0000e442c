"""Streamed answers: OpenAI's `chat.completion.chunk` frames and Anthropic's event sequence."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import orjson

from flow_api.testing.wire import Answer, Api, Chat


def stream_events(chat: Chat, ans: Answer, request_id: str) -> Iterator[tuple[bytes, bool]]:
    """The SSE frames of a streamed answer, each with whether it carries a token (one a word)."""
    if chat.api is Api.OPENAI:
        return _openai_stream(chat, ans, request_id)
    return _anthropic_stream(chat, ans, request_id)


def _sse(data: dict[str, Any], event: str | None = None) -> bytes:
    head = b"event: " + event.encode() + b"\n" if event else b""
    return head + b"data: " + orjson.dumps(data) + b"\n\n"


def _pieces(text: str) -> Iterator[str]:
    first = True
    for word in text.split(" "):
        yield word if first else " " + word
        first = False


def _openai_stream(chat: Chat, ans: Answer, request_id: str) -> Iterator[tuple[bytes, bool]]:
    base = {
        "id": f"chatcmpl-{request_id}",
        "object": "chat.completion.chunk",
        "created": int(time.time()),
        "model": chat.model,
        "system_fingerprint": None,
    }

    def chunk(delta: dict[str, str], finish: str | None = None) -> bytes:
        choice = {"index": 0, "delta": delta, "logprobs": None, "finish_reason": finish}
        return _sse({**base, "choices": [choice]})

    yield chunk({"role": "assistant", "content": ""}), False
    for piece in _pieces(ans.text):
        yield chunk({"content": piece}), True
    yield chunk({}, "length" if ans.truncated else "stop"), False
    if chat.include_usage:
        usage = {
            "prompt_tokens": chat.prompt_tokens,
            "completion_tokens": ans.tokens,
            "total_tokens": chat.prompt_tokens + ans.tokens,
        }
        yield _sse({**base, "choices": [], "usage": usage}), False
    yield b"data: [DONE]\n\n", False


def _anthropic_stream(chat: Chat, ans: Answer, request_id: str) -> Iterator[tuple[bytes, bool]]:
    message: dict[str, Any] = {
        "id": f"msg_{request_id}",
        "type": "message",
        "role": "assistant",
        "model": chat.model,
        "content": [],
        "stop_reason": None,
        "stop_sequence": None,
        "usage": {"input_tokens": chat.prompt_tokens, "output_tokens": 1},
    }
    yield _sse({"type": "message_start", "message": message}, "message_start"), False
    block = {
        "type": "content_block_start",
        "index": 0,
        "content_block": {"type": "text", "text": ""},
    }
    yield _sse(block, "content_block_start"), False
    yield _sse({"type": "ping"}, "ping"), False
    for piece in _pieces(ans.text):
        delta = {
            "type": "content_block_delta",
            "index": 0,
            "delta": {"type": "text_delta", "text": piece},
        }
        yield _sse(delta, "content_block_delta"), True
    yield _sse({"type": "content_block_stop", "index": 0}, "content_block_stop"), False
    stop = "max_tokens" if ans.truncated else "end_turn"
    end = {
        "type": "message_delta",
        "delta": {"stop_reason": stop, "stop_sequence": None},
        "usage": {"output_tokens": ans.tokens},
    }
    yield _sse(end, "message_delta"), False
    yield _sse({"type": "message_stop"}, "message_stop"), False
