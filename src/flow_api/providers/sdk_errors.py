"""Map the OpenAI and Anthropic SDK exceptions (same shape in both), and those of our own
OpenAI-compatible chat model, to domain errors."""

from __future__ import annotations

import email.utils
import json
import time
from typing import Any

import aiohttp
from langchain_core.exceptions import ContextOverflowError

from flow_api.errors import (
    ContentFiltered,
    ContextTooLong,
    ProviderAuthFailed,
    ProviderError,
    ProviderRateLimited,
    ProviderRejected,
    ProviderTimeout,
    ProviderUnavailable,
)
from flow_api.providers.openai_compatible import MalformedAnswer, ProviderHTTPError
from flow_api.providers.ratelimit_headers import ratelimit_headers
from flow_api.redaction import redact_secrets

_CONTEXT_CODES = frozenset({"context_length_exceeded", "string_above_max_length"})
_FILTER_CODES = frozenset({"content_filter", "content_policy_violation"})


def retry_after_seconds(headers: Any) -> float | None:
    """Seconds to wait from `retry-after-ms` or `retry-after` (seconds or an HTTP date)."""
    if headers is None:
        return None
    millis = headers.get("retry-after-ms")
    if millis:
        try:
            return max(float(millis) / 1000, 0.0)
        except ValueError:
            pass
    value = headers.get("retry-after")
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        parsed = email.utils.parsedate_to_datetime(value)
        return max(parsed.timestamp() - time.time(), 0.0) if parsed else None


def map_sdk_error(exc: BaseException, sdk: Any) -> ProviderError | None:
    """Translate an exception of the `openai` or `anthropic` module `sdk`; None if not its own."""
    if isinstance(exc, ContextOverflowError):  # LangChain's own type (Anthropic has no code)
        return ContextTooLong(f"the prompt is too long for the model: {str(exc)[:500]}")
    if isinstance(exc, json.JSONDecodeError):  # the SDKs let a malformed 200 body through as is
        return ProviderUnavailable(f"the provider sent a malformed answer: {exc.msg}")
    if isinstance(exc, sdk.APITimeoutError) and not _refused(exc):
        return ProviderTimeout("the provider did not answer in time")
    if isinstance(exc, sdk.APIConnectionError):
        return ProviderUnavailable(f"could not reach the provider: {exc}")
    if not isinstance(exc, sdk.APIStatusError):
        if isinstance(exc, sdk.APIError):  # malformed or unexpected body
            return ProviderUnavailable(f"the provider sent an unusable answer: {exc.message}")
        return None
    return map_status(
        exc.status_code, getattr(exc, "code", None), _detail(exc), exc.response.headers
    )


def map_status(status: int, code: str | None, detail: str, headers: Any) -> ProviderError:
    """The domain error of a provider's non-2xx answer: its status, the body's error `code`, its
    message (`detail`, already scrubbed of credentials) and the answer's headers."""
    if status == 429:
        return ProviderRateLimited(
            f"rate limited by the provider: {detail}",
            retry_after=retry_after_seconds(headers),
            ratelimit=ratelimit_headers(headers),
        )
    if status in (401, 403):
        return ProviderAuthFailed(f"the provider refused the credentials ({status}): {detail}")
    if code in _CONTEXT_CODES:
        return ContextTooLong(f"the prompt is too long for the model: {detail}")
    if code in _FILTER_CODES:
        return ContentFiltered(f"the provider's content filter refused the prompt: {detail}")
    if status in (408, 409) or status >= 500:
        return ProviderUnavailable(f"the provider failed ({status}): {detail}")
    return ProviderRejected(f"the provider rejected the request ({status}): {detail}")


def map_http_error(exc: BaseException) -> ProviderError | None:
    """Translate an exception of our own OpenAI-compatible chat model (`openai_compatible`) or
    of its aiohttp transport; None if it is neither."""
    if isinstance(exc, ProviderHTTPError):
        return map_status(exc.status, exc.code, redact_secrets(exc.message)[:500], exc.headers)
    if isinstance(exc, json.JSONDecodeError | MalformedAnswer):
        return ProviderUnavailable(f"the provider sent a malformed answer: {exc}"[:300])
    if isinstance(exc, TimeoutError):  # aiohttp's own timeouts are TimeoutErrors too
        return ProviderTimeout("the provider did not answer in time")
    if isinstance(exc, aiohttp.ClientError):  # refused, reset, dropped, a cut body
        return ProviderUnavailable(f"could not reach the provider: {type(exc).__name__}")
    return None


def _refused(exc: BaseException) -> bool:
    # The SDK's aiohttp transport reports every connection failure as a connect *timeout*; the
    # chained causes keep the real one (ConnectionRefusedError, ServerDisconnectedError).
    seen: BaseException | None = exc
    for _ in range(8):
        if seen is None:
            return False
        if isinstance(seen, ConnectionRefusedError):
            return True
        if isinstance(seen, aiohttp.ClientConnectionError) and not isinstance(seen, TimeoutError):
            return True  # refused, reset or dropped: the provider is not answering at all
        seen = seen.__cause__ or seen.__context__
    return False


def _detail(exc: Any) -> str:
    # The SDK's message carries the provider's error text, never the request headers; but a
    # 401's text may quote the (masked) key, so credential-shaped text is scrubbed.
    message = str(getattr(exc, "message", "") or exc)
    return redact_secrets(message)[:500]
