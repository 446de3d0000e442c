"""A worker process's webhook duties: sweep the outbox, send deliveries, until stopped."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

from flow_api.keys import webhook_pending_key, webhook_queue_name
from flow_api.queue.deliveries import AttemptLog, DeliveryQueue
from flow_api.queue.delivery_worker import DeliveryConsumer
from flow_api.queue.producer import JobQueue
from flow_api.queue.store import JobStore
from flow_api.settings import Settings
from flow_api.webhooks.delivery import Sender
from flow_api.webhooks.outbox import Outbox, Sweeper
from flow_api.webhooks.secrets import SecretStore

log = logging.getLogger(__name__)


class WebhookRunner:
    """No side effects until `run()`; `stop()` ends it (a delivery in flight is left to
    BullMQ's stalled check, so it is sent again: at-least-once)."""

    def __init__(self, settings: Settings, redis: Redis) -> None:
        self.settings = settings
        self.redis = redis
        self._tasks: list[asyncio.Task[None]] = []
        self._consumer: DeliveryConsumer | None = None

    async def run(self) -> None:
        s, hooks = self.settings, self.settings.webhook
        name = webhook_queue_name(s.redis.queue_name)
        jobs = JobQueue(self.redis, s.redis, s.worker)
        deliveries = DeliveryQueue(self.redis, s.redis, s.worker, name)
        outbox = Outbox(self.redis, webhook_pending_key(s.redis.prefix, s.redis.queue_name))
        sweeper = Sweeper(outbox, JobStore(jobs), deliveries, retries=len(hooks.schedule_s))
        secrets = SecretStore(self.redis, s.redis.queue_name)
        sender = Sender(hooks, secrets, AttemptLog(self.redis, jobs.bull.toKey))
        self._consumer = DeliveryConsumer(s.redis, s.worker, hooks, name, sender.send)
        self._tasks = [
            asyncio.create_task(sweeper.run(hooks.sweep_interval_s)),
            asyncio.create_task(self._consumer.run()),
        ]
        try:
            await asyncio.gather(*self._tasks)
        except Exception:
            log.exception("webhook sweeps and deliveries stopped in this worker process")
            raise
        finally:
            for task in self._tasks:
                task.cancel()
            for task in self._tasks:
                with contextlib.suppress(asyncio.CancelledError, Exception):
                    await task
            # Not `close()` on the two bullmq queues: they share the process's Redis pool,
            # which bullmq would close under its other users; the pool's owner closes it.
            await sender.aclose()

    async def stop(self) -> None:
        if self._consumer is not None:
            await self._consumer.stop()
        for task in self._tasks:
            task.cancel()
