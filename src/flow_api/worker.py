"""Runs jobs: one attempt = provider lookup -> pipeline under a timeout -> recorded outcome."""

from __future__ import annotations

import asyncio
import contextlib
import logging
from typing import Any

from pydantic import ValidationError

from flow_api import history
from flow_api.auth.metering import UsageMeter
from flow_api.budget import RateBudget
from flow_api.errors import (
    FlowError,
    InvalidRequest,
    JobCancelled,
    JobExpired,
    ProviderTimeout,
)
from flow_api.models import GenerateRequest
from flow_api.pipeline import generate
from flow_api.providers import Provider, ProviderRegistry
from flow_api.queue import JobHandle, QueueConsumer, is_cancel_request
from flow_api.settings import Settings

log = logging.getLogger(__name__)


class FlowWorker:
    """A worker process's job runner. No side effects until `run()`; `stop()` drains."""

    def __init__(self, settings: Settings, registry: ProviderRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.meter = UsageMeter(settings)  # settles each job's token quota reservation
        self.budget = RateBudget(settings)  # provider rate limits shared by all workers
        self.consumer = QueueConsumer(
            settings.redis, settings.worker, self.meter.metered(self.process)
        )
        self._turns = {
            name: asyncio.Semaphore(provider.max_concurrency)
            for name, provider in registry.providers.items()
            if provider.max_concurrency
        }

    async def run(self) -> None:
        log.info(
            "worker consuming queue %r with %d slots; providers: %s (default %s)",
            self.settings.redis.queue_name,
            self.settings.worker.concurrency,
            ", ".join(self.registry.names) or "none",
            self.registry.default,
        )
        warming = [asyncio.create_task(_warm(p)) for p in self.registry.providers.values()]
        try:
            async with self.meter, self.budget:
                await self.consumer.run()
        finally:
            for task in warming:
                task.cancel()

    async def stop(self) -> None:
        await self.consumer.stop()

    async def process(self, job: JobHandle) -> dict[str, Any]:
        """One attempt at a job; returns the generation, or raises a `FlowError`."""
        try:
            request = GenerateRequest.model_validate(job.data.get("request"))
        except ValidationError as exc:
            raise InvalidRequest(f"the stored job is not a valid request: {exc}") from exc
        provider_name = job.data.get("provider") or request.options.provider
        provider = self.registry.get(provider_name)
        model = job.data.get("model") or provider.resolve_model(request.options.model)
        ticket = await self.budget.admit(job, provider.name, model, request)  # or waits queued
        cancelled = await job.begin(history.attempt_started(job.attempt, provider.name, model))
        timeout = self._timeout_s(request)
        error: FlowError | None = None
        try:
            if cancelled:
                raise JobCancelled("cancelled before it started; no provider call was made")
            _check_deadline(job)
            async with self._turn(provider.name), asyncio.timeout(timeout):
                generation = await generate(provider, model, request, observe=ticket.observe)
        except TimeoutError:
            error = ProviderTimeout(f"the provider call exceeded the {timeout:g} s timeout")
        except asyncio.CancelledError as exc:
            if not is_cancel_request(exc):
                raise  # shutdown: the consumer hands the job back
            _uncancel()
            error = JobCancelled("cancelled while running; the provider call was aborted")
        except FlowError as exc:
            error = exc
        if error is not None:
            await job.log(history.attempt_ended(job.attempt, error))
            retry = " (will retry)" if _will_retry(job, error) else ""
            log.info(
                "job %s attempt %d/%d failed: %s%s",
                job.id,
                job.attempt,
                job.max_attempts,
                error.code,
                retry,
            )
            # Tokens back at once; after a 429 back to the queue, no attempt spent.
            await self.budget.failed(job, ticket, error)
        if error is not None:
            raise error
        await self.budget.settle(ticket, generation)
        job.log_at_finish(history.attempt_ended(job.attempt, None))  # written with the result
        # DEBUG, not INFO: at hundreds of jobs/s a line per success was 1-3% of the worker's
        # CPU (py-spy) and a flood of lines; failures and retries still log at INFO.
        log.debug("job %s completed on attempt %d", job.id, job.attempt)
        return generation.wire()

    def _turn(self, provider: str) -> contextlib.AbstractAsyncContextManager[Any]:
        """Wait for a turn on a provider with a concurrency cap (the local model)."""
        turn = self._turns.get(provider)
        return turn if turn is not None else contextlib.nullcontext()

    def _timeout_s(self, request: GenerateRequest) -> float:
        if request.options.timeout_ms is not None:
            return request.options.timeout_ms / 1000
        return self.settings.worker.job_timeout_s


async def _warm(provider: Provider) -> None:
    try:
        await provider.warm_up()
    except Exception as exc:  # the first job will report it with its code
        log.warning("could not warm up provider %s: %s", provider.name, exc)


def _check_deadline(job: JobHandle) -> None:
    start_by = job.data.get("startBy")
    if job.attempt == 1 and isinstance(start_by, int) and history.now_ms() > start_by:
        late = (history.now_ms() - start_by) / 1000
        raise JobExpired(f"not started before its deadline (startWithinMs); {late:.1f} s late")


def _uncancel() -> None:
    task = asyncio.current_task()
    if task is not None:
        task.uncancel()


def _will_retry(job: JobHandle, error: FlowError) -> bool:
    return error.retryable and job.attempt < job.max_attempts
