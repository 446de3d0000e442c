"""What a provider's rate-limit headers say: per dimension, the limit, what remains, the reset.

OpenAI and Azure: `x-ratelimit-{limit,remaining,reset}-{requests,tokens}`, resets as durations
(`6ms`, `1.5s`, `1m0s`). Anthropic: `anthropic-ratelimit-{requests,tokens,input-tokens,
output-tokens}-{limit,remaining,reset}`, resets as RFC 3339 instants; its `tokens-*` headers
repeat whichever of the input and output limits is the tighter, so they are read only when the
separate ones are absent.
"""

from __future__ import annotations

import re
import time
from collections.abc import Mapping
from dataclasses import dataclass
from datetime import datetime

from flow_api.budget.dimensions import Dimension

_DURATION = re.compile(r"(\d+(?:\.\d+)?)(ms|h|m|s)")
_UNIT_S = {"ms": 0.001, "s": 1.0, "m": 60.0, "h": 3600.0}


@dataclass(frozen=True, slots=True)
class Gauge:
    """One dimension's state as the provider counts it: its per-minute `limit`, what
    `remaining` of it, and `reset_s`, when it is whole again (None when not stated)."""

    limit: int
    remaining: int | None
    reset_s: float | None


def read_gauges(headers: Mapping[str, str] | None) -> dict[Dimension, Gauge]:
    """The gauges stated in `headers` (lower-case names, as `ratelimit_headers` copies them)."""
    if not headers:
        return {}
    gauges: dict[Dimension, Gauge] = {}
    for dim, name in (
        (Dimension.REQUESTS, "requests"),
        (Dimension.TOKENS, "tokens"),
    ):
        gauge = _gauge(
            headers.get(f"x-ratelimit-limit-{name}"),
            headers.get(f"x-ratelimit-remaining-{name}"),
            _duration_s(headers.get(f"x-ratelimit-reset-{name}")),
        )
        if gauge is not None:
            gauges[dim] = gauge
    for dim, name in (
        (Dimension.REQUESTS, "requests"),
        (Dimension.INPUT, "input-tokens"),
        (Dimension.OUTPUT, "output-tokens"),
        (Dimension.TOKENS, "tokens"),
    ):
        if dim is Dimension.TOKENS and (Dimension.INPUT in gauges or Dimension.OUTPUT in gauges):
            continue
        prefix = f"anthropic-ratelimit-{name}"
        gauge = _gauge(
            headers.get(f"{prefix}-limit"),
            headers.get(f"{prefix}-remaining"),
            _instant_s(headers.get(f"{prefix}-reset")),
        )
        if gauge is not None:
            gauges[dim] = gauge
    return gauges


def _gauge(limit: str | None, remaining: str | None, reset_s: float | None) -> Gauge | None:
    total = _count(limit)
    if not total:
        return None
    return Gauge(total, _count(remaining), reset_s)


def _count(value: str | None) -> int | None:
    if value is None:
        return None
    try:
        return max(int(float(value)), 0)
    except ValueError:
        return None


def _duration_s(value: str | None) -> float | None:
    """`6ms`, `1.5s`, `1m0s`, `2h3m` (OpenAI), or plain seconds."""
    if not value:
        return None
    try:
        return max(float(value), 0.0)
    except ValueError:
        pass
    parts = _DURATION.findall(value)
    if not parts:
        return None
    return sum(float(number) * _UNIT_S[unit] for number, unit in parts)


def _instant_s(value: str | None) -> float | None:
    """Seconds from now until an RFC 3339 instant (Anthropic), never negative."""
    if not value:
        return None
    try:
        at = datetime.fromisoformat(value.replace("Z", "+00:00"))
    except ValueError:
        return _duration_s(value)
    return max(at.timestamp() - time.time(), 0.0)
