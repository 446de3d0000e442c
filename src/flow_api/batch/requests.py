"""One line of a batch input file: an OpenAI batch request, read into our `GenerateRequest`.

A line is `{"custom_id": str, "method": "POST", "url": "/v1/chat/completions", "body": {...}}`,
the body a Chat Completions request. What the body may carry:

- `model`: provider and model. `local/gemma-3-270m`, `anthropic/claude-…`, `openai/gpt-…`,
  `azure/<deployment>`, `fake/…` name the provider; a plain name (`gpt-4o-mini`) is a model
  of the default provider (`FLOW_PROVIDER_DEFAULT`); `anthropic/` alone is that provider's
  default model; no `model` at all, the default provider's default model.
- `messages`: `system` and `developer` messages become `options.system`, `user` messages the
  `prompt` (several joined by blank lines); text parts only.
- `temperature`, `seed`, `stop`: the options of the same name; `max_tokens` or
  `max_completion_tokens`: `options.maxTokens`.
- `n` (1 only), `stream` (false only), `user`, `store`, `metadata`: accepted, nothing to do.

Anything else (tools, assistant turns, images, `n` > 1) is refused at validation, naming the
line: the service runs one system + user turn per job.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import orjson
from pydantic import ValidationError

from flow_api.errors import FlowError
from flow_api.models import GenerateOptions, GenerateRequest

ENDPOINT = "/v1/chat/completions"
PROVIDER_NAMES = ("openai", "azure", "anthropic", "local", "fake")
_IGNORED = {"n", "stream", "user", "store", "metadata"}
_OPTIONS = {"temperature", "seed", "stop", "max_tokens", "max_completion_tokens"}
MAX_CUSTOM_ID = 512


@dataclass(frozen=True, slots=True)
class LineError:
    """What is wrong with one line; `line` counts from 1, as OpenAI's `errors.data[].line`."""

    code: str
    message: str
    line: int
    param: str | None = None

    def wire(self) -> dict[str, Any]:
        return {"code": self.code, "message": self.message, "param": self.param, "line": self.line}


@dataclass(frozen=True, slots=True)
class BatchRequest:
    custom_id: str
    request: GenerateRequest


class _Refused(Exception):
    def __init__(self, code: str, message: str, param: str | None = None) -> None:
        super().__init__(message)
        self.code, self.message, self.param = code, message, param


def parse_line(raw: bytes, number: int) -> BatchRequest | LineError:
    """Line `number` (from 0) as a request, or what is wrong with it."""
    try:
        return _parse(raw)
    except _Refused as refused:
        return LineError(refused.code, refused.message, number + 1, refused.param)


def custom_id_of(raw: bytes) -> str | None:
    """The line's `custom_id` when it has a usable one (for output lines of any line)."""
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError:
        return None
    value = line.get("custom_id") if isinstance(line, dict) else None
    return value if isinstance(value, str) else None


def _parse(raw: bytes) -> BatchRequest:
    try:
        line = orjson.loads(raw)
    except orjson.JSONDecodeError as exc:
        raise _Refused("invalid_json", f"the line is not JSON: {exc}") from None
    if not isinstance(line, dict):
        raise _Refused("invalid_json", "the line is not a JSON object")
    custom_id = line.get("custom_id")
    if not isinstance(custom_id, str) or not custom_id:
        raise _Refused("missing_custom_id", "custom_id must be a non-empty string", "custom_id")
    if len(custom_id) > MAX_CUSTOM_ID:
        raise _Refused("invalid_custom_id", f"custom_id is over {MAX_CUSTOM_ID} characters")
    if line.get("method") != "POST":
        raise _Refused("invalid_method", "method must be POST", "method")
    if line.get("url") != ENDPOINT:
        raise _Refused("invalid_url", f"url must be {ENDPOINT}", "url")
    unknown = set(line) - {"custom_id", "method", "url", "body"}
    if unknown:
        raise _Refused("invalid_request", f"unknown field {sorted(unknown)[0]!r}")
    body = line.get("body")
    if not isinstance(body, dict):
        raise _Refused("invalid_request", "body must be an object", "body")
    return BatchRequest(custom_id, _request(body))


def _request(body: dict[str, Any]) -> GenerateRequest:
    for name in body:
        if name not in _OPTIONS | _IGNORED | {"model", "messages"}:
            raise _Refused("unsupported_parameter", f"body.{name} is not supported", f"body.{name}")
    if body.get("n", 1) != 1:
        raise _Refused("unsupported_parameter", "only n = 1 is supported", "body.n")
    if body.get("stream", False) is not False:
        raise _Refused("unsupported_parameter", "no streaming in a batch", "body.stream")
    model = body.get("model", "")
    if not isinstance(model, str):
        raise _Refused("invalid_request", "body.model must be a string", "body.model")
    provider, model_name = split_model(model)
    system, prompt = _messages(body.get("messages"))
    options: dict[str, Any] = {}
    if model_name:
        options["model"] = model_name
    if provider is not None:
        options["provider"] = provider
    if system:
        options["system"] = system
    for name in ("temperature", "seed"):
        if name in body and body[name] is not None:
            options[name] = body[name]
    stop = body.get("stop")
    if stop is not None:
        options["stop"] = [stop] if isinstance(stop, str) else stop
    most = body.get("max_completion_tokens", body.get("max_tokens"))
    if most is not None:
        options["maxTokens"] = most
    try:
        return GenerateRequest(prompt=prompt, options=GenerateOptions.model_validate(options))
    except ValidationError as exc:
        first = exc.errors()[0]
        where = ".".join(str(part) for part in first["loc"])
        raise _Refused("invalid_request", f"{where}: {first['msg']}", f"body.{where}") from None


def split_model(model: str) -> tuple[str | None, str]:
    """`provider/model` → (provider, model); a plain name → (None: the default provider, it);
    `provider/` → (provider, ""): its default model. Only a known provider name before the
    first `/` is a provider: `org/model` stays a model name."""
    head, slash, rest = model.partition("/")
    if slash and head in PROVIDER_NAMES:
        return head, rest
    return None, model


def _messages(messages: Any) -> tuple[str, str]:
    if not isinstance(messages, list) or not messages:
        raise _Refused("invalid_request", "body.messages must be a non-empty list", "body.messages")
    system: list[str] = []
    prompt: list[str] = []
    for index, message in enumerate(messages):
        where = f"body.messages[{index}]"
        if not isinstance(message, dict):
            raise _Refused("invalid_request", f"{where} must be an object", where)
        role = message.get("role")
        text = _text(message.get("content"), where)
        if role in ("system", "developer"):
            system.append(text)
        elif role == "user":
            prompt.append(text)
        else:
            raise _Refused(
                "unsupported_parameter",
                f"{where}.role {role!r} is not supported: one system and user turn per line",
                f"{where}.role",
            )
    if not prompt:
        raise _Refused("invalid_request", "body.messages has no user message", "body.messages")
    return "\n\n".join(system), "\n\n".join(prompt)


def _text(content: Any, where: str) -> str:
    if isinstance(content, str):
        return content
    if isinstance(content, list):
        parts = []
        for part in content:
            if not (isinstance(part, dict) and part.get("type") == "text"):
                raise _Refused("unsupported_parameter", f"{where}: only text parts", where)
            text = part.get("text")
            if not isinstance(text, str):
                raise _Refused("invalid_request", f"{where}: a text part needs text", where)
            parts.append(text)
        return "".join(parts)
    raise _Refused("invalid_request", f"{where}.content must be text", f"{where}.content")


def flow_error_line(error: FlowError, number: int) -> LineError:
    """A check of ours (provider, model, limits) refusing line `number` (from 0)."""
    param = f"body.{error.field}" if error.field else None
    return LineError(error.code, error.message, number + 1, param)
