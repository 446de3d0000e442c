"""What a job's stream holds, as both the worker (writing) and the API (reading) see it.

Each Redis Stream entry has two fields: `e`, the event's kind, and `d`, its JSON data. The
entry's id is the event's SSE `id`, so a client resumes with it from any API process.

- `status` `{"status": "active", "attempt": n}`: attempt n started its provider call;
  `{"status": "retrying", "attempt": n, "error": {...}}`: attempt n failed and another follows.
- `token` `{"attempt": n, "text": "..."}`: text attempt n received (one or more tokens: the
  worker batches them). A client that sees a later attempt start discards earlier attempts' text.
- `end` `{"status": "completed" | "failed" | "cancelled" | "expired"}`: the job's outcome was
  decided; the API answers it with the job's `result` or `error` event (what `/result` says).

Two events are the API's own, never stored: the first `status` `{"status": "waiting",
"attempt": 0}` (id `0-0`, the job as submitted) and, for a job that ended without an `end` entry
(its stream expired, or the worker died before writing it), the final event with the id after
the stream's last one.
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from flow_api.errors import FlowError

KIND = "e"
DATA = "d"

STATUS = "status"
TOKEN = "token"
END = "end"
RESULT = "result"
ERROR = "error"

START_ID = "0-0"
"""The id of the API's first `status` (`waiting`) event: the position before every entry."""

_ENTRY_ID = re.compile(r"(\d{1,20})-(\d{1,20})")


@dataclass(frozen=True, slots=True)
class StreamEvent:
    """One server-sent event of a job's stream."""

    id: str
    event: str
    data: dict[str, Any]


class InvalidEventId(FlowError):
    """A `Last-Event-ID` this service could not have sent."""

    code = "invalid_last_event_id"
    status = 400


def parse_event_id(value: str | None) -> str | None:
    """The stream position a client's `Last-Event-ID` names (None: from the start); raises
    `InvalidEventId` for anything that is not an id of ours (`<ms>-<seq>`)."""
    if value is None:
        return None
    value = value.strip()
    if _ENTRY_ID.fullmatch(value) is None:
        raise InvalidEventId(
            "Last-Event-ID must be the id of an event of this stream, like 1733241600000-0",
            field="Last-Event-ID",
        )
    return value


def next_id(entry_id: str) -> str:
    """The id right after `entry_id` (for the API's own final event)."""
    ms, seq = entry_id.split("-")
    return f"{ms}-{int(seq) + 1}"
