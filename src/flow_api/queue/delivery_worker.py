"""The consumer of webhook deliveries (worker processes only; the queue is `queue/deliveries`).

The stock bullmq `Worker` runs them: unlike generation jobs they are few, so its cost per job at
high concurrency (see `slot_worker`) does not matter here.
"""

from __future__ import annotations

import asyncio
import logging
from typing import Any

from bullmq import UnrecoverableError, Worker
from pydantic import ValidationError

from flow_api.queue.backoff import RedisBackoff
from flow_api.queue.connection import REDIS_TROUBLE
from flow_api.queue.deliveries import Delivery, Send, retry_delay_ms
from flow_api.queue.slot_worker import MAX_BLOCK_S
from flow_api.settings import RedisSettings, WebhookSettings, WorkerSettings

log = logging.getLogger(__name__)


class _DeliveryWorker(Worker):  # type: ignore[misc]  # bullmq ships no type information
    def __init__(self, name: str, processor: Any, opts: dict[str, Any]) -> None:
        super().__init__(name, processor, opts)
        self.backoff = RedisBackoff()

    @property
    def maximumBlockTimeout(self) -> float:
        # As in `slot_worker`: a blocking wait past redis-py's socket timeout made delayed
        # jobs (here: retries) start up to minutes late.
        return MAX_BLOCK_S

    async def getNextJob(self, token: str) -> Any:
        # bullmq's loop retries a failed take at once: against a Redis refusing writes (out of
        # memory) that was a thousand takes, and log lines, a second. Back off as the slots do.
        await self.backoff.wait()
        try:
            job = await super().getNextJob(token)
        except REDIS_TROUBLE as exc:
            if self.closing:
                return None
            await self.backoff.failed("webhook take", exc)
            return None
        self.backoff.succeeded()
        return job


class DeliveryConsumer:
    """Runs `send` on delivery jobs with `concurrency` at a time until `stop()`."""

    def __init__(
        self,
        redis_settings: RedisSettings,
        worker: WorkerSettings,
        webhook: WebhookSettings,
        name: str,
        send: Send,
    ) -> None:
        self.name = name
        self.send = send
        self.options: dict[str, Any] = {
            "autorun": False,
            "connection": redis_settings.url,
            "prefix": redis_settings.prefix,
            "concurrency": webhook.concurrency,
            "lockDuration": worker.lock_duration_ms,
            "stalledInterval": worker.stalled_interval_ms,
            "maxStalledCount": worker.max_stalled,
            "drainDelay": 1,  # bullmq's close() waits up to drainDelay seconds while idle
            "runRetryDelay": 1000,
            "settings": {
                "backoffStrategy": lambda attempts, _type, _err, _job: retry_delay_ms(
                    webhook.schedule_s, webhook.jitter, attempts
                )
            },
        }
        self.worker: Worker | None = None

    async def _process(self, job: Any, _token: str) -> None:
        try:
            delivery = Delivery.model_validate(job.data)
        except ValidationError as exc:  # not a delivery of ours: never retried
            raise UnrecoverableError(f"not a webhook delivery: {exc}") from None
        await self.send(delivery, int(job.attemptsMade) + 1)

    async def run(self) -> None:
        self.worker = _DeliveryWorker(self.name, self._process, self.options)
        self.worker.on("error", _log_error)
        await self.worker.run()

    async def stop(self) -> None:
        """Stop taking deliveries; one in flight gets a moment, then is left to the stalled
        check (it is sent again: at-least-once)."""
        if self.worker is None:
            return
        closing = asyncio.ensure_future(self.worker.close())
        try:
            await asyncio.wait_for(asyncio.shield(closing), 5)
        except TimeoutError:
            self.worker.cancelProcessing()
            # A close that never ends (seen: a stop landing while bullmq's run was still
            # naming its connection, whose pool then failed) must not hold the worker's exit.
            await asyncio.wait([closing], timeout=5)
            if not closing.done():
                closing.cancel()
                log.warning("the webhook delivery worker did not close; left to exit")
        except Exception as exc:  # the close itself failed: nothing more to stop
            log.warning("webhook delivery worker close: %s: %s", type(exc).__name__, exc)


def _log_error(err: BaseException, *_: Any) -> None:
    log.warning("webhook delivery worker error: %s: %s", type(err).__name__, err)
