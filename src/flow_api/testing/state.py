"""The simulator's configuration and counters."""

from __future__ import annotations

import dataclasses
from dataclasses import dataclass, field
from typing import Any


@dataclass(slots=True)
class SimulatorConfig:
    """How the simulator behaves; fields may be changed while it runs.

    `latency_s` is added before every successful answer (the time to first byte when streaming),
    plus `completion_tokens / tokens_per_s` when that is set. `rpm`/`tpm` are 60 s sliding-window
    budgets; a request costs its prompt words plus its `max_tokens` (16 when absent, corrected to
    the answer's length once known). `itpm`/`otpm` are Anthropic's separate input and output
    token budgets (Messages API only; the output is estimated from `max_tokens`, then corrected).
    Every answer carries the provider's rate-limit headers (`x-ratelimit-*` on the OpenAI routes,
    `anthropic-ratelimit-*` on the Messages route) once any limit is set. `window_s` shortens
    the window the per-minute limits count over (the headers still state per-minute figures).
    `retry_after_s` is the Retry-After of a scripted `429` step. `error_note` is appended to
    every error answer's message, as a gateway in front of a provider may add its own text
    (tests put credentials in it to check that none reaches a job or a log).
    """

    latency_s: float = 0.0
    tokens_per_s: float | None = None
    rpm: int | None = None
    tpm: int | None = None
    itpm: int | None = None
    otpm: int | None = None
    retry_after_s: float = 1.0
    window_s: float = 60.0  # what `rpm`/`tpm` count over; benchmarks may scale the minute down
    error_note: str = ""


@dataclass(slots=True)
class SimulatorStats:
    """Counters since start or the last `reset()`. `tokens_served` counts completion tokens."""

    requests: int = 0
    by_status: dict[int, int] = field(default_factory=dict)
    by_key: dict[str, int] = field(default_factory=dict)
    answered_by_key: dict[str, int] = field(default_factory=dict)
    """Successful answers per script key (a call paid for in full)."""
    by_api: dict[str, int] = field(default_factory=dict)
    prompt_tokens: int = 0
    tokens_served: int = 0
    rate_limited: int = 0  # every 429, scripted or not
    throttled: int = 0  # 429s from the rpm/tpm budgets
    resets: int = 0  # connections closed without an answer
    in_flight: int = 0
    max_in_flight: int = 0

    def to_dict(self) -> dict[str, Any]:
        """A JSON-ready copy (status codes become string keys)."""
        data = dataclasses.asdict(self)
        data["by_status"] = {str(code): n for code, n in self.by_status.items()}
        return data
