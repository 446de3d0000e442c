"""Runs jobs: one attempt = provider lookup -> pipeline under a timeout -> recorded outcome."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from pydantic import ValidationError

from flow_api import history
from flow_api.errors import FlowError, InvalidRequest, ProviderTimeout
from flow_api.models import GenerateRequest
from flow_api.pipeline import generate
from flow_api.providers import ProviderRegistry
from flow_api.queue import JobHandle, QueueConsumer
from flow_api.settings import Settings

log = logging.getLogger(__name__)


class FlowWorker:
    """A worker process's job runner. No side effects until `run()`; `stop()` drains."""

    def __init__(self, settings: Settings, registry: ProviderRegistry) -> None:
        self.settings = settings
        self.registry = registry
        self.consumer = QueueConsumer(settings.redis, settings.worker, self.process)

    async def run(self) -> None:
        log.info(
            "worker consuming queue %r with %d slots; providers: %s (default %s)",
            self.settings.redis.queue_name,
            self.settings.worker.concurrency,
            ", ".join(self.registry.names) or "none",
            self.registry.default,
        )
        await self.consumer.run()

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
        await job.log(history.attempt_started(job.attempt, provider.name, model))
        timeout = self._timeout_s(request)
        error: FlowError | None = None
        try:
            async with asyncio.timeout(timeout):
                generation = await generate(provider, model, request)
        except TimeoutError:
            error = ProviderTimeout(f"the provider call exceeded the {timeout:g} s timeout")
        except FlowError as exc:
            error = exc
        finally:
            if error is not None:
                await job.log(history.attempt_ended(job.attempt, error))
                log.info(
                    "job %s attempt %d/%d failed: %s%s",
                    job.id,
                    job.attempt,
                    job.max_attempts,
                    error.code,
                    " (will retry)" if _will_retry(job, error) else "",
                )
        if error is not None:
            raise error
        await job.log(history.attempt_ended(job.attempt, None))
        log.info("job %s completed on attempt %d", job.id, job.attempt)
        return generation.wire()

    def _timeout_s(self, request: GenerateRequest) -> float:
        if request.options.timeout_ms is not None:
            return request.options.timeout_ms / 1000
        return self.settings.worker.job_timeout_s


def _will_retry(job: JobHandle, error: FlowError) -> bool:
    return error.retryable and job.attempt < job.max_attempts
