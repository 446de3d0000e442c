"""Sliding-window (60 s by default) request and token budgets, answered the way OpenAI does."""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass

WINDOW_S = 60.0


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `6ms`, `1.5s`, `1m0s`."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 0)}ms"
    minutes, rest = divmod(seconds, 60)
    rest = round(rest, 3)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


@dataclass(slots=True)
class Admission:
    """The limiter's answer: `retry_after` is None when the request was admitted."""

    retry_after: float | None
    headers: dict[str, str]
    limit: str = ""  # "requests" or "tokens" when refused


class SlidingWindow:
    """Requests and tokens admitted in the last 60 s. A refused request costs nothing.

    `rpm`/`tpm` are read on each call, so a caller may change them while the server runs.
    """

    def __init__(self) -> None:
        self._entries: deque[tuple[float, int]] = deque()
        self._tokens = 0
        self.window_s = WINDOW_S  # benchmarks shorten it to reach a steady state sooner

    def reset(self) -> None:
        self._entries.clear()
        self._tokens = 0

    def admit(
        self,
        now: float,
        cost: int,
        rpm: int | None,
        tpm: int | None,
        window_s: float = WINDOW_S,
    ) -> Admission:
        """Admit a request costing `cost` tokens at time `now`, or say how long to wait.
        `rpm`/`tpm` count over `window_s` (a minute unless a benchmark scales it down)."""
        self.window_s = window_s
        if rpm is None and tpm is None:
            return Admission(None, {})
        self._expire(now)
        retry_after: float | None = None
        limit = ""
        if rpm is not None and len(self._entries) >= rpm:
            retry_after, limit = self._wait_for_requests(now, rpm), "requests"
        elif tpm is not None and self._tokens + cost > tpm:
            retry_after, limit = self._wait_for_tokens(now, cost, tpm), "tokens"
        else:
            self._entries.append((now, cost))
            self._tokens += cost
        return Admission(retry_after, self._headers(now, rpm, tpm), limit)

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        entries = self._entries
        while entries and entries[0][0] <= horizon:
            self._tokens -= entries.popleft()[1]

    def _wait_for_requests(self, now: float, rpm: int) -> float:
        if rpm <= 0 or len(self._entries) < rpm:
            return self.window_s
        # The window holds len >= rpm entries; one frees when the (len - rpm + 1)-th oldest expires.
        return self._entries[len(self._entries) - rpm][0] + self.window_s - now

    def _wait_for_tokens(self, now: float, cost: int, tpm: int) -> float:
        if cost > tpm:
            return self.window_s  # never fits; a real provider would answer 400 or a long wait
        excess = self._tokens + cost - tpm
        for stamp, tokens in self._entries:
            excess -= tokens
            if excess <= 0:
                return stamp + self.window_s - now
        return self.window_s

    def _headers(self, now: float, rpm: int | None, tpm: int | None) -> dict[str, str]:
        entries = self._entries
        until_empty = entries[-1][0] + self.window_s - now if entries else 0.0
        headers: dict[str, str] = {}
        if rpm is not None:
            headers["x-ratelimit-limit-requests"] = str(rpm)
            headers["x-ratelimit-remaining-requests"] = str(max(rpm - len(entries), 0))
            headers["x-ratelimit-reset-requests"] = format_reset(until_empty)
        if tpm is not None:
            headers["x-ratelimit-limit-tokens"] = str(tpm)
            headers["x-ratelimit-remaining-tokens"] = str(max(tpm - self._tokens, 0))
            headers["x-ratelimit-reset-tokens"] = format_reset(until_empty)
        return headers


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, rounded up, at least 1."""
    return str(max(math.ceil(seconds), 1))
