"""The submit span, as a FastAPI dependency: open for the whole submit, current while it runs.

A dependency with `yield` runs in the request's task before the route and closes after it, so
the span is the current one while the route builds the job (`JobData.trace` takes its
context) and records the error of a refused submit.
"""

from __future__ import annotations

from collections.abc import AsyncIterator
from typing import Annotated

from fastapi import Depends
from opentelemetry.trace import Span, SpanKind

from flow_api.observability.tracing import tracer


async def _submit_span() -> AsyncIterator[Span]:
    with tracer().start_as_current_span("flow.submit", kind=SpanKind.PRODUCER) as span:
        yield span


SubmitSpanDep = Annotated[Span, Depends(_submit_span)]
