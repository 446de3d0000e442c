"""What a worker tells about each attempt: its span, its log fields, its metrics, its usage.

`ObservedHandler` wraps the attempt chain (the queue consumer's handler) and `observed_call`
wraps the provider call inside it, so neither the chain nor its steps know about metrics or
traces. The attempt span is the current span while the chain runs, so the provider call's
span (and any span a library opens in the same task) is its child; its parent is the submit
span whose context the job carries (`JobData.trace`), so every attempt of a job, on any worker,
and every retry, is in the submit's trace.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Awaitable, Callable
from typing import TYPE_CHECKING, Any

from opentelemetry import trace
from opentelemetry.trace import SpanKind, Status, StatusCode

from flow_api.errors import (
    FlowError,
    JobCancelled,
    JobExpired,
    ProviderRateLimited,
    QueueUnavailable,
)
from flow_api.jobs import JobData, now_ms
from flow_api.models import Generation
from flow_api.observability.logs import job_context
from flow_api.observability.metrics import METRICS
from flow_api.observability.tracing import context_of, trace_id_of, tracer
from flow_api.observability.usage import PriceTable, UsageLedger
from flow_api.queue.consumer import AttemptFailed, JobDeferred, JobHandle

if TYPE_CHECKING:
    from flow_api.worker.attempt import Attempt

log = logging.getLogger(__name__)

Handler = Callable[[JobHandle], Awaitable[dict[str, Any]]]
Call = Callable[["Attempt"], Awaitable[Generation]]


def outcome_of(error: BaseException) -> str:
    """The end state a final error gives a job."""
    if isinstance(error, JobCancelled):
        return "cancelled"
    if isinstance(error, JobExpired):
        return "expired"
    return "failed"


class ObservedHandler:
    """The attempt chain, with its span, log context, metrics and usage around it."""

    def __init__(self, chain: Handler, ledger: UsageLedger) -> None:
        self.chain = chain
        self.ledger = ledger

    async def __call__(self, job: JobHandle) -> dict[str, Any]:
        try:
            data: JobData | None = job.data
        except FlowError:  # not our envelope: the chain fails it with its reason
            data = None
        provider = (data.provider if data else None) or "unknown"
        model = (data.model if data else None) or "default"
        tenant = data.tenant if data else "unknown"
        labels = METRICS.job_labels(provider, model, tenant)
        if job.starts == 1 and job.queued_at_ms:
            METRICS.queue_seconds.labels(*labels[:2]).observe(
                max(0, now_ms() - job.queued_at_ms) / 1000
            )
        carrier = data.trace if data else None
        attributes: dict[str, str | int] = {
            "flow.job_id": job.id,
            "flow.attempt": job.attempt,
            "flow.tenant": tenant,
        }
        started = time.perf_counter()
        outcome = "completed"
        with (
            job_context(job.id, tenant, job.attempt, trace_id_of(carrier)),
            tracer().start_as_current_span(
                "flow.attempt",
                context=context_of(carrier),
                kind=SpanKind.CONSUMER,
                attributes=attributes,
                record_exception=False,
                set_status_on_exception=False,
            ) as span,
        ):
            try:
                result = await self.chain(job)
            except JobDeferred:
                outcome = "deferred"
                METRICS.budget_deferrals.labels(*labels[:2]).inc()
                span.set_attribute("flow.outcome", outcome)
                raise
            except AttemptFailed as failed:
                outcome = self._failed(span, labels, failed)
                raise
            except BaseException:  # shutdown: handed back, not an outcome
                outcome = "handed_back"
                span.set_attribute("flow.outcome", outcome)
                raise
            finally:
                METRICS.attempt_seconds.labels(*labels[:2], outcome).observe(
                    time.perf_counter() - started
                )
            span.set_attribute("flow.outcome", outcome)
            await self._completed(job, data, tenant, result)
            return result

    def _failed(self, span: trace.Span, labels: tuple[str, str, str], failed: AttemptFailed) -> str:
        error = failed.error
        code = error.code if isinstance(error, FlowError) else type(error).__name__
        span.set_status(Status(StatusCode.ERROR, code))
        span.set_attribute("flow.error_code", code)
        if isinstance(error, QueueUnavailable):
            METRICS.redis_errors.labels("attempt").inc()
        if not failed.final:
            span.set_attribute("flow.outcome", "retry")
            METRICS.attempts_retried.labels(*labels[:2], code).inc()
            return "retry"
        outcome = outcome_of(error)
        span.set_attribute("flow.outcome", outcome)
        METRICS.jobs_finished.labels(*labels, outcome).inc()
        return outcome

    async def _completed(
        self, job: JobHandle, data: JobData | None, tenant: str, result: dict[str, Any]
    ) -> None:
        generation = Generation.model_validate(result)
        labels = METRICS.job_labels(generation.provider, generation.model, tenant)
        usage = generation.usage
        METRICS.jobs_finished.labels(*labels, "completed").inc()
        METRICS.tokens.labels(*labels, "prompt").inc(usage.prompt_tokens)
        METRICS.tokens.labels(*labels, "completion").inc(usage.completion_tokens)
        if generation.cost is not None:
            METRICS.cost.labels(*labels).inc(generation.cost.amount)
        key_id = data.charge.key_id if data and data.charge else None
        model = f"{generation.provider}/{generation.model}"
        try:
            await self.ledger.record(
                tenant, key_id, model, usage, generation.cost, pipelined=job.pipelined
            )
        except Exception as exc:  # the job's result must not be lost for its usage line
            if isinstance(exc, FlowError):
                METRICS.redis_errors.labels("usage").inc()
            log.warning("job %s: usage not recorded: %s", job.id, type(exc).__name__)


def observed_call(call: Call, prices: PriceTable) -> Call:
    """`call` (the provider call) in a span of its own, timed, with the answer priced."""

    async def run(attempt: Attempt) -> Generation:
        assert attempt.provider is not None
        provider, model = attempt.provider.name, attempt.model
        labels = (provider, METRICS.policy.model(provider, model))
        attributes = {"gen_ai.system": provider, "gen_ai.request.model": model}
        started = time.perf_counter()
        with tracer().start_as_current_span(
            "flow.provider_call", kind=SpanKind.CLIENT, attributes=attributes
        ) as span:
            try:
                generation = await call(attempt)
            except FlowError as error:
                if isinstance(error, ProviderRateLimited):
                    METRICS.provider_rate_limited.labels(*labels).inc()
                METRICS.provider_call_seconds.labels(*labels, error.code).observe(
                    time.perf_counter() - started
                )
                span.set_status(Status(StatusCode.ERROR, error.code))
                raise
            METRICS.provider_call_seconds.labels(*labels, "ok").observe(
                time.perf_counter() - started
            )
            usage = generation.usage
            span.set_attribute("gen_ai.usage.input_tokens", usage.prompt_tokens)
            span.set_attribute("gen_ai.usage.output_tokens", usage.completion_tokens)
            cost = prices.cost(generation.provider, generation.model, usage)
            return generation.model_copy(update={"cost": cost})

    return run
