"""Log lines as text or JSON (`FLOW_LOG_FORMAT=json`), each carrying the job it is about.

While a worker runs an attempt, `job_context` puts the job id, tenant, attempt number and
trace id in a context variable; `JobFields` copies them onto every record logged in that task
(by our code or a library's), so each JSON line has `job_id`, `tenant`, `attempt` and
`trace_id` fields. Text lines keep their format: the job id is in their message already.
What is logged does not change with the format: never a prompt or an answer at INFO.
"""

from __future__ import annotations

import contextlib
import logging
from collections.abc import Iterator
from contextvars import ContextVar
from typing import Literal

from pythonjsonlogger.json import JsonFormatter

TEXT_FORMAT = "%(asctime)s %(levelname)s %(name)s: %(message)s"
FIELDS = ("job_id", "tenant", "attempt", "trace_id")

_job: ContextVar[dict[str, object] | None] = ContextVar("flow_job", default=None)


@contextlib.contextmanager
def job_context(job_id: str, tenant: str, attempt: int, trace_id: str | None) -> Iterator[None]:
    """Tag every log record of the current task with this job until the block ends."""
    token = _job.set({"job_id": job_id, "tenant": tenant, "attempt": attempt, "trace_id": trace_id})
    try:
        yield
    finally:
        _job.reset(token)


class JobFields(logging.Filter):
    """Adds the current job's fields (`job_context`) to a record; never drops one."""

    def filter(self, record: logging.LogRecord) -> bool:
        fields = _job.get()
        if fields is not None:
            for name, value in fields.items():
                if value is not None and not hasattr(record, name):
                    setattr(record, name, value)
        return True


def formatter(log_format: Literal["text", "json"]) -> logging.Formatter:
    """The formatter of every handler: text as before, or one JSON object per line with
    `time`, `level`, `logger`, `message` (and `exc_info`), plus the job's fields."""
    if log_format == "text":
        return logging.Formatter(TEXT_FORMAT)
    # python-json-logger: a well-kept formatter, rather than our own json.dumps of records
    return JsonFormatter(
        "{asctime}{levelname}{name}{message}",
        style="{",
        rename_fields={"asctime": "time", "levelname": "level", "name": "logger"},
        datefmt="%Y-%m-%dT%H:%M:%S%z",
    )


def configure_logging(level: str, log_format: Literal["text", "json"]) -> None:
    """Configure the root logger once, at an entry point."""
    handler = logging.StreamHandler()
    handler.setFormatter(formatter(log_format))
    handler.addFilter(JobFields())
    logging.basicConfig(level=level.upper(), handlers=[handler], force=True)
