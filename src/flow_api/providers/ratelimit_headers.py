"""Copy a provider answer's rate-limit headers, for the worker's rate budget (see `budget/`).

Both OpenAI (and Azure) and Anthropic send their limits, what remains of them and when they
reset on every answer, a 429 included. Only these few headers are copied (a fixed set of
lookups, not the whole header dict that LangChain's `include_response_headers` copies).
"""

from __future__ import annotations

from typing import Any

#: Where the headers land in a model message's `response_metadata`.
RATELIMIT_FIELD = "ratelimit"

_OPENAI = tuple(
    f"x-ratelimit-{part}-{dim}"
    for dim in ("requests", "tokens")
    for part in ("limit", "remaining", "reset")
)
_ANTHROPIC = tuple(
    f"anthropic-ratelimit-{dim}-{part}"
    for dim in ("requests", "tokens", "input-tokens", "output-tokens")
    for part in ("limit", "remaining", "reset")
)
RATELIMIT_HEADERS = (*_OPENAI, *_ANTHROPIC, "retry-after", "retry-after-ms")


def ratelimit_headers(headers: Any) -> dict[str, str]:
    """The rate-limit headers present in `headers` (any mapping with `.get`), by lower-case
    name."""
    if headers is None:
        return {}
    found: dict[str, str] = {}
    for name in RATELIMIT_HEADERS:
        value = headers.get(name)
        if value:
            found[name] = str(value)
    return found
