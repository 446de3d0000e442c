"""The dimensions a provider limits per minute, and an amount in each."""

from __future__ import annotations

import enum
from dataclasses import dataclass


class Dimension(enum.StrEnum):
    """A per-minute limit. The value is the field prefix in Redis (`r`, `t`, `i`, `o`)."""

    REQUESTS = "r"  # requests per minute (RPM)
    TOKENS = "t"  # prompt + completion tokens per minute (OpenAI's TPM)
    INPUT = "i"  # input tokens per minute (Anthropic's ITPM)
    OUTPUT = "o"  # output tokens per minute (Anthropic's OTPM)


DIMENSIONS = tuple(Dimension)


@dataclass(frozen=True, slots=True)
class Amounts:
    """One number per dimension: limits per minute (0 = none), or what a call is charged."""

    requests: int = 0
    tokens: int = 0
    input: int = 0
    output: int = 0

    def of(self, dim: Dimension) -> int:
        return {
            Dimension.REQUESTS: self.requests,
            Dimension.TOKENS: self.tokens,
            Dimension.INPUT: self.input,
            Dimension.OUTPUT: self.output,
        }[dim]

    def as_list(self) -> list[int]:
        """In `DIMENSIONS` order (the order the Lua scripts take them)."""
        return [self.requests, self.tokens, self.input, self.output]

    @property
    def any(self) -> bool:
        return any(self.as_list())

    def minus(self, other: Amounts) -> Amounts:
        return Amounts(
            self.requests - other.requests,
            self.tokens - other.tokens,
            self.input - other.input,
            self.output - other.output,
        )
