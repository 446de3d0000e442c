"""Sliding-window request and token limits, answered with OpenAI's or Anthropic's headers.

Limits are per-minute figures, as the providers state them; a benchmark may shorten the window
the limiter counts over (`window_s`), and the limiter then admits `limit * window_s / 60` in any
window while its headers still state the per-minute figures, so a client that learns the limits
from the headers paces itself right at the shorter scale.

How each provider counts a request (from their rate-limit guides):

- OpenAI: one token budget (TPM) charged at admission with the prompt plus `max_tokens`. With no
  `max_tokens` the simulator charges the prompt plus 16 at admission and settles the answer's
  real length once it is known.
- Anthropic: separate input (ITPM) and output (OTPM) budgets; the output is estimated from
  `max_tokens` at admission and corrected to the real output when the answer is done.

Headers are sent on every answer (a 429 too), as both providers do.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta

from flow_api.testing.wire import Api

WINDOW_S = 60.0


def format_reset(seconds: float) -> str:
    """OpenAI's reset format: `6ms`, `1.5s`, `1m0s`."""
    if seconds < 1:
        return f"{max(round(seconds * 1000), 0)}ms"
    minutes, rest = divmod(seconds, 60)
    rest = round(rest, 3)
    return f"{int(minutes)}m{rest:g}s" if minutes else f"{rest:g}s"


def format_instant(seconds: float) -> str:
    """Anthropic's reset format: the RFC 3339 instant `seconds` from now."""
    at = datetime.now(UTC) + timedelta(seconds=max(seconds, 0.0))
    return at.isoformat(timespec="milliseconds").replace("+00:00", "Z")


@dataclass(frozen=True, slots=True)
class RateLimits:
    """Per-minute limits; None means no limit. `itpm`/`otpm` apply to Anthropic requests."""

    rpm: int | None = None
    tpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None

    @property
    def any(self) -> bool:
        return any(v is not None for v in (self.rpm, self.tpm, self.itpm, self.otpm))


@dataclass(slots=True, eq=False)
class Charge:
    """What one admitted request counts for, until it leaves the window."""

    at: float
    input: int
    output: int
    live: bool = True  # still inside the window

    @property
    def tokens(self) -> int:
        return self.input + self.output


@dataclass(slots=True)
class Admission:
    """The limiter's answer: `retry_after` is None when the request was admitted."""

    retry_after: float | None
    headers: dict[str, str]
    limit: str = ""  # "requests", "tokens", "input tokens" or "output tokens" when refused
    charge: Charge | None = None  # the admitted request's charge, to settle after the answer


@dataclass(slots=True)
class _Totals:
    input: int = 0
    output: int = 0
    entries: deque[Charge] = field(default_factory=deque)


class SlidingWindow:
    """Requests and tokens admitted in the last window. A refused request costs nothing."""

    def __init__(self) -> None:
        self._totals = _Totals()
        self.window_s = WINDOW_S  # benchmarks shorten it to reach a steady state sooner

    def reset(self) -> None:
        self._totals = _Totals()

    def admit(
        self,
        now: float,
        prompt_tokens: int,
        output_estimate: int,
        limits: RateLimits,
        api: Api = Api.OPENAI,
        window_s: float = WINDOW_S,
    ) -> Admission:
        """Admit a request at `now` charged `prompt_tokens` in and `output_estimate` out, or
        say how long to wait; the headers follow `api`'s dialect."""
        self.window_s = window_s
        if not limits.any:
            return Admission(None, {})
        self._expire(now)
        wanted = Charge(now, prompt_tokens, output_estimate)
        refused = self._refusal(now, wanted, limits, api)
        if refused is None:
            self._totals.entries.append(wanted)
            self._totals.input += wanted.input
            self._totals.output += wanted.output
            return Admission(None, self._headers(now, limits, api), charge=wanted)
        limit, wait = refused
        return Admission(wait, self._headers(now, limits, api), limit)

    def settle(self, charge: Charge, output: int) -> None:
        """Correct an admitted request's output charge to what it really produced."""
        if charge.live:
            self._totals.output += output - charge.output
        charge.output = output

    # --- internals ------------------------------------------------------------------------

    def _scaled(self, per_minute: int | None) -> int | None:
        if per_minute is None:
            return None
        return max(round(per_minute * self.window_s / WINDOW_S), 1)

    def _refusal(
        self, now: float, wanted: Charge, limits: RateLimits, api: Api
    ) -> tuple[str, float] | None:
        totals = self._totals
        rpm = self._scaled(limits.rpm)
        if rpm is not None and len(totals.entries) >= rpm:
            return "requests", self._wait_for_requests(now, rpm)
        checks: list[tuple[str, int | None, int, str]] = [
            ("tokens", self._scaled(limits.tpm), wanted.tokens, "tokens")
        ]
        if api is Api.ANTHROPIC:
            checks += [
                ("input tokens", self._scaled(limits.itpm), wanted.input, "input"),
                ("output tokens", self._scaled(limits.otpm), wanted.output, "output"),
            ]
        for name, limit, cost, part in checks:
            if limit is not None and self._used(part) + cost > limit:
                return name, self._wait_for(now, cost, limit, part)
        return None

    def _used(self, part: str) -> int:
        totals = self._totals
        if part == "input":
            return totals.input
        if part == "output":
            return totals.output
        return totals.input + totals.output

    def _expire(self, now: float) -> None:
        horizon = now - self.window_s
        totals = self._totals
        while totals.entries and totals.entries[0].at <= horizon:
            gone = totals.entries.popleft()
            gone.live = False
            totals.input -= gone.input
            totals.output -= gone.output

    def _wait_for_requests(self, now: float, rpm: int) -> float:
        entries = self._totals.entries
        if len(entries) < rpm:
            return self.window_s
        # The window holds len >= rpm entries; one frees when the (len - rpm + 1)-th oldest expires.
        return entries[len(entries) - rpm].at + self.window_s - now

    def _wait_for(self, now: float, cost: int, limit: int, part: str) -> float:
        if cost > limit:
            return self.window_s  # never fits; a real provider would answer 400 or a long wait
        excess = self._used(part) + cost - limit
        for entry in self._totals.entries:
            excess -= entry.tokens if part == "tokens" else getattr(entry, part)
            if excess <= 0:
                return entry.at + self.window_s - now
        return self.window_s

    def _headers(self, now: float, limits: RateLimits, api: Api) -> dict[str, str]:
        entries = self._totals.entries
        until_empty = entries[-1].at + self.window_s - now if entries else 0.0
        # Remaining counts are stated per minute, like the limits (see the module docstring).
        per_minute = WINDOW_S / self.window_s
        rows: list[tuple[str, int | None, int]] = [
            ("requests", limits.rpm, len(entries)),
            ("tokens", limits.tpm, self._used("tokens")),
        ]
        if api is Api.ANTHROPIC:
            rows += [
                ("input-tokens", limits.itpm, self._used("input")),
                ("output-tokens", limits.otpm, self._used("output")),
            ]
        headers: dict[str, str] = {}
        for name, limit, used in rows:
            if limit is None:
                continue
            remaining = str(max(limit - round(used * per_minute), 0))
            if api is Api.ANTHROPIC:
                headers[f"anthropic-ratelimit-{name}-limit"] = str(limit)
                headers[f"anthropic-ratelimit-{name}-remaining"] = remaining
                headers[f"anthropic-ratelimit-{name}-reset"] = format_instant(until_empty)
            else:
                headers[f"x-ratelimit-limit-{name}"] = str(limit)
                headers[f"x-ratelimit-remaining-{name}"] = remaining
                headers[f"x-ratelimit-reset-{name}"] = format_reset(until_empty)
        return headers


def retry_after_header(seconds: float) -> str:
    """`Retry-After` in whole seconds, rounded up, at least 1."""
    return str(max(math.ceil(seconds), 1))
