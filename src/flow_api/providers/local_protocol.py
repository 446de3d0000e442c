"""What a model process and its supervisor say to each other over the child's stdin/stdout.

Each message is one frame: a 4-byte big-endian length, then a JSON object. The supervisor sends
`complete` and `cancel`; the model process answers `ready` (or `fatal`) once after its start-up
self-test, then per call a `token` per generated token and one `done` or `error`. One call runs
at a time per process, so messages need no ids beyond the call's.
"""

from __future__ import annotations

import struct
from typing import IO, Any

import orjson

from flow_api.errors import (
    ContextTooLong,
    FlowError,
    ProviderError,
    ProviderMisconfigured,
    ProviderRejected,
)
from flow_api.providers.local_model import Completion, CompletionRequest, Turn

HEADER = struct.Struct(">I")
MAX_FRAME = 64 << 20  # far above any prompt the API accepts; a larger header is corruption

# Errors a model process reports by code and the supervisor raises again as the same type.
_ERRORS: dict[str, type[ProviderError]] = {
    e.code: e for e in (ContextTooLong, ProviderRejected, ProviderMisconfigured)
}

Message = dict[str, Any]


class ProtocolError(Exception):
    """A frame that cannot be read: the other side is broken."""


def write_frame(stream: IO[bytes], message: Message) -> None:
    """Send one message (blocking) and flush it."""
    body = orjson.dumps(message)
    stream.write(HEADER.pack(len(body)) + body)
    stream.flush()


def read_frame(stream: IO[bytes]) -> Message | None:
    """The next message, or None when the other side closed the pipe (or died)."""
    header = _read_exactly(stream, HEADER.size)
    if header is None:
        return None
    (length,) = HEADER.unpack(header)
    if length > MAX_FRAME:
        raise ProtocolError(f"a frame of {length} bytes")
    body = _read_exactly(stream, length)
    if body is None:
        return None
    message = orjson.loads(body)
    if not isinstance(message, dict):
        raise ProtocolError("a frame that is not a JSON object")
    return message


def _read_exactly(stream: IO[bytes], size: int) -> bytes | None:
    data = b""
    while len(data) < size:
        chunk = stream.read(size - len(data))
        if not chunk:
            return None
        data += chunk
    return data


def request_message(call_id: int, request: CompletionRequest) -> Message:
    return {
        "op": "complete",
        "id": call_id,
        "turns": [list(t) for t in request.turns],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "stop": list(request.stop),
        "seed": request.seed,
    }


def request_from(message: Message) -> CompletionRequest:
    return CompletionRequest(
        turns=tuple(Turn(str(role), str(text)) for role, text in message["turns"]),
        max_tokens=int(message["max_tokens"]),
        temperature=float(message["temperature"]),
        stop=tuple(str(s) for s in message["stop"]),
        seed=None if message["seed"] is None else int(message["seed"]),
    )


def done_message(call_id: int, completion: Completion) -> Message:
    return {
        "op": "done",
        "id": call_id,
        "text": completion.text,
        "prompt_tokens": completion.prompt_tokens,
        "completion_tokens": completion.completion_tokens,
        "finish_reason": completion.finish_reason,
    }


def completion_from(message: Message) -> Completion:
    return Completion(
        text=str(message["text"]),
        prompt_tokens=int(message["prompt_tokens"]),
        completion_tokens=int(message["completion_tokens"]),
        finish_reason=str(message["finish_reason"]),
    )


def error_message(op: str, exc: BaseException, call_id: int | None = None) -> Message:
    """An `error` (one call failed) or `fatal` (the process cannot serve) message."""
    code = exc.code if isinstance(exc, FlowError) else ProviderError.code
    text = exc.message if isinstance(exc, FlowError) else f"{type(exc).__name__}: {exc}"
    return {"op": op, "id": call_id, "code": code, "message": text[:2000]}


def error_from(message: Message) -> ProviderError:
    """The domain error a model process reported (unknown codes become a plain ProviderError)."""
    kind = _ERRORS.get(str(message.get("code")), ProviderError)
    return kind(str(message.get("message")))
