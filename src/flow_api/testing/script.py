"""Scripted faults: a `[[sim:KEY:STEP,STEP,...]]` marker in a prompt picks each request's fate.

The simulator counts requests per KEY; the n-th request with a KEY gets the n-th STEP, and the
last step repeats once the list is exhausted. Because the count lives in the simulator, a script
works across client processes (workers retrying a job in another process still advance it).
"""

from __future__ import annotations

import enum
import functools
import re
from dataclasses import dataclass

MARKER = re.compile(r"\[\[sim:([A-Za-z0-9_.\-]+):([^\]]*)\]\]")
MARKER_PREFIX = "[[sim:"
HANG_FOREVER_S = 3600.0


class StepKind(enum.Enum):
    """What the simulator does with one request."""

    OK = "ok"
    STATUS = "status"  # an error answer with `Step.status`
    RATE_LIMITED = "429"
    HANG = "hang"
    MALFORMED = "malformed"
    CONTEXT = "ctx"
    FILTER = "filter"
    RESET = "reset"


@dataclass(frozen=True, slots=True)
class Step:
    """One parsed step. `seconds` is the hang time, or the Retry-After of a 429."""

    kind: StepKind
    status: int = 200
    seconds: float | None = None
    # For 429: False means "send no Retry-After header"; None seconds means "use the default".
    retry_after_header: bool = True


OK = Step(StepKind.OK)
_SIMPLE = {
    "ok": OK,
    "hang": Step(StepKind.HANG, seconds=HANG_FOREVER_S),
    "malformed": Step(StepKind.MALFORMED),
    "ctx": Step(StepKind.CONTEXT, status=400),
    "filter": Step(StepKind.FILTER, status=400),
    "reset": Step(StepKind.RESET),
    "429": Step(StepKind.RATE_LIMITED, status=429),
    "429-": Step(StepKind.RATE_LIMITED, status=429, retry_after_header=False),
}


class ScriptError(ValueError):
    """A marker names a step the simulator does not know."""


def parse_step(text: str) -> Step:
    """`ok`, a status 400-599, `429@S`, `429-`, `hang`, `hang@S`, `malformed`, `ctx`, `filter`,
    `reset`."""
    word = text.strip().lower()
    simple = _SIMPLE.get(word)
    if simple is not None:
        return simple
    head, sep, tail = word.partition("@")
    try:
        if sep and head == "429":
            return Step(StepKind.RATE_LIMITED, status=429, seconds=float(tail))
        if sep and head == "hang":
            return Step(StepKind.HANG, seconds=float(tail))
        status = int(word)
    except ValueError:
        raise ScriptError(f"unknown simulator step {text!r}") from None
    if not 400 <= status <= 599:
        raise ScriptError(f"simulator step status {status} is not an error status (400-599)")
    if status == 429:
        return _SIMPLE["429"]
    return Step(StepKind.STATUS, status=status)


@functools.lru_cache(maxsize=1024)
def parse_steps(text: str) -> tuple[Step, ...]:
    """The steps of a marker, parsed once per distinct marker text."""
    steps = tuple(parse_step(part) for part in text.split(",") if part.strip())
    if not steps:
        raise ScriptError("a simulator marker needs at least one step")
    return steps


@dataclass(frozen=True, slots=True)
class Marker:
    """The script found in a prompt."""

    key: str
    steps: tuple[Step, ...]


def find_marker(text: str) -> Marker | None:
    """The first marker in `text`, or None; raises `ScriptError` for an unknown step."""
    if MARKER_PREFIX not in text:
        return None
    found = MARKER.search(text)
    if found is None:
        return None
    return Marker(found.group(1), parse_steps(found.group(2)))


def strip_markers(text: str) -> str:
    """`text` without its markers (and without the spaces they leave at either end)."""
    if MARKER_PREFIX not in text:
        return text
    return MARKER.sub("", text).strip()


class Script:
    """Per-KEY request counters; `next` picks the step for one more request with a marker."""

    def __init__(self) -> None:
        self.counts: dict[str, int] = {}

    def next(self, marker: Marker) -> Step:
        n = self.counts.get(marker.key, 0)
        self.counts[marker.key] = n + 1
        return marker.steps[min(n, len(marker.steps) - 1)]

    def reset(self) -> None:
        self.counts.clear()
