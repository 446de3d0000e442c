"""What a provider's limiter charges a call, mirrored before the call and settled after it.

From the providers' rate-limit guides:

- OpenAI and Azure count one token budget (TPM), charged when the request is admitted with an
  estimate of the prompt plus the request's whole `max_tokens` ("usage needs are estimated from
  this value"); the budget charges that and keeps charging it after the call. A request with no
  `max_tokens` is charged its prompt plus the completion the model has recently been returning
  (a decaying average kept in Redis per provider/model), settled to the real completion.
- Anthropic counts input (ITPM) and output (OTPM) tokens apart; OTPM is estimated from
  `max_tokens` at the start and then corrected to the real output. The budget paces by what the
  provider ends up charging (the recent average output, capped by `max_tokens`) and settles to
  the real output; the provider's own up-front hold is covered by its bucket, a minute deep,
  and its `remaining` headers correct the budget should that run short.

No charge exceeds the model's output limit (`OUTPUT_LIMITS`): a request asking more cannot be
served as asked, and must not hold the budget for it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass

from flow_api.budget.dimensions import Amounts

#: Longest completions per model family (longest prefix wins), from the providers' model pages.
OUTPUT_LIMITS: dict[str, int] = {
    "gpt-3.5-turbo": 4_096,
    "gpt-4-turbo": 4_096,
    "gpt-4o": 16_384,
    "gpt-4o-mini": 16_384,
    "gpt-4.1": 32_768,
    "gpt-5": 128_000,
    "o1": 100_000,
    "o3": 100_000,
    "o4-mini": 100_000,
    "claude-3-haiku": 4_096,
    "claude-3-opus": 4_096,
    "claude-3-5-haiku": 8_192,
    "claude-3-5-sonnet": 8_192,
    "claude-3-7-sonnet": 64_000,
    "claude-sonnet-4": 64_000,
    "claude-opus-4": 32_000,
    "claude-haiku-4": 64_000,
}
#: For a model not in the table.
DEFAULT_OUTPUT_LIMIT = 16_384
#: Prompt tokens per character before any answer says otherwise.
DEFAULT_PER_CHAR = 0.25
#: Weight of the newest answer in the decaying averages.
DECAY = 0.2

SEPARATE_IO = frozenset({"anthropic"})  # providers that limit input and output apart


def output_limit(model: str) -> int:
    """The model's longest completion: the longest matching prefix in `OUTPUT_LIMITS`."""
    best = ""
    for prefix in OUTPUT_LIMITS:
        if model.startswith(prefix) and len(prefix) > len(best):
            best = prefix
    return OUTPUT_LIMITS[best] if best else DEFAULT_OUTPUT_LIMIT


@dataclass(frozen=True, slots=True)
class Averages:
    """What a provider/model's recent answers taught: prompt tokens per character and the
    completion length (None until an answer said)."""

    per_char: float = DEFAULT_PER_CHAR
    completion: float | None = None


@dataclass(frozen=True, slots=True)
class ChargeModel:
    """How one provider/model's limiter charges a call."""

    provider: str
    model: str
    default_completion: int  # before any answer says, and for a provider that reports none

    @property
    def separate_io(self) -> bool:
        return self.provider in SEPARATE_IO

    def cap(self, max_tokens: int | None) -> int:
        """The completion a call may be charged at most."""
        limit = output_limit(self.model)
        return min(max_tokens, limit) if max_tokens is not None else limit

    def before(self, chars: int, max_tokens: int | None, averages: Averages) -> Amounts:
        """The charge reserved before the call."""
        prompt = math.ceil(chars * averages.per_char)
        expected = averages.completion
        completion = self.default_completion if expected is None else math.ceil(expected)
        completion = min(max(completion, 1), self.cap(max_tokens))
        if not self.separate_io and max_tokens is not None:
            completion = self.cap(max_tokens)  # OpenAI charges the whole max_tokens
        return Amounts(1, prompt + completion, prompt, completion)

    def after(self, prompt: int, completion: int, max_tokens: int | None) -> Amounts:
        """What the provider charged, from the answer's usage."""
        if not self.separate_io and max_tokens is not None:
            completion = max(completion, self.cap(max_tokens))
        return Amounts(1, prompt + completion, prompt, completion)
