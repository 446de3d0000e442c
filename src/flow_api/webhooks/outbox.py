"""The outbox of job endings: every job with a webhook gets exactly one event, whatever ends it.

A job's ending is decided in several places (the cancel-or-finish decision, the deadline check,
a final failure, BullMQ's own stalled check failing a job that crashed its workers too often),
and a worker can die right after any of them. Rather than hook each, the API writes the job's
id to a pending set before queueing it (`Outbox.register`), and each worker process sweeps
that set (`Sweeper`): a job found in BullMQ's completed or failed set has ended, for good, and
its event type is read from its stored outcome (`history.JobHistory`, the same reading the
status endpoint gives). The event is queued for delivery under the id `evt_<jobId>`, then the
entry leaves the set. A crash between the two repeats the queueing, which BullMQ keeps as the
one job of that id: one event per job, at least once delivered, never missed.
"""

from __future__ import annotations

import asyncio
import logging

import orjson
from redis.asyncio import Redis

from flow_api.errors import FlowError, JobNotFound
from flow_api.history import JobHistory
from flow_api.jobs import now_ms
from flow_api.models import WebhookEventType
from flow_api.queue.connection import REDIS_TROUBLE
from flow_api.queue.deliveries import Delivery, DeliveryQueue
from flow_api.queue.store import JobStore, StoredJob

log = logging.getLogger(__name__)

_PASS_FAILURES: tuple[type[BaseException], ...] = (*REDIS_TROUBLE, FlowError)

ORPHAN_AFTER_MS = 600_000
"""An entry whose job does not exist this long after submit was never queued (the submit
failed after registering it) or was removed: it is dropped."""

# One pass over up to ARGV[3] pending entries from rank ARGV[2]: the ids whose job has ended
# (in BullMQ's completed or failed set), and the rank to start the next pass from (0 once the
# end is reached). Entries of jobs that never existed, or no longer do, are dropped.
# KEYS: pending, completed, failed. ARGV: job key prefix, start rank, count, orphan-before ms.
_SWEEP = """
local start = tonumber(ARGV[2])
local rows = redis.call("ZRANGE", KEYS[1], start, start + tonumber(ARGV[3]) - 1, "WITHSCORES")
local ended = {}
for i = 1, #rows, 2 do
  local id = rows[i]
  if redis.call("ZSCORE", KEYS[2], id) or redis.call("ZSCORE", KEYS[3], id) then
    ended[#ended + 1] = id
  elseif tonumber(rows[i + 1]) < tonumber(ARGV[4])
      and redis.call("EXISTS", ARGV[1] .. id) == 0 then
    redis.call("ZREM", KEYS[1], id)
  end
end
local following = 0
if #rows / 2 == tonumber(ARGV[3]) then following = start + #rows / 2 end
return {following, ended}
"""


def event_id(job_id: str) -> str:
    """The one event a job's ending makes: stable, so receivers can de-duplicate on it."""
    return f"evt_{job_id}"


def event_body(history: JobHistory) -> tuple[WebhookEventType, str]:
    """The event's type and JSON body (Standard Webhooks' `type`, `timestamp`, `data`): the
    job's status view, as `GET /api/ai/status/{jobId}` answers it."""
    view = history.view
    kind = WebhookEventType(view.status.value)
    at = view.finished_at or view.created_at
    stamp = at.isoformat().replace("+00:00", "Z")  # as the API writes times
    body = {"type": f"job.{kind.value}", "timestamp": stamp, "data": view.wire()}
    return kind, orjson.dumps(body).decode()


class Outbox:
    """The pending set (`keys.webhook_pending_key`)."""

    def __init__(self, redis: Redis, pending_key: str) -> None:
        self.redis = redis
        self.key = pending_key

    async def register(self, job_id: str) -> None:
        """Before the job is queued: its ending will be swept up whatever decides it."""
        await self.redis.zadd(self.key, {job_id: now_ms()}, nx=True)


class Sweeper:
    """Finds ended jobs in the outbox and queues their events (one per worker process; several
    processes sweeping at once queue each event once, by its id)."""

    def __init__(
        self,
        outbox: Outbox,
        store: JobStore,
        deliveries: DeliveryQueue,
        retries: int,
        batch: int = 500,
    ) -> None:
        self.outbox = outbox
        self.store = store
        self.deliveries = deliveries
        self.retries = retries
        self.batch = batch
        self._sweep = outbox.redis.register_script(_SWEEP)
        self._rank = 0

    async def sweep_once(self) -> int:
        """One pass over a batch of the set; the number of events queued."""
        key = self.store.bull.toKey
        following, ended = await self._sweep(
            keys=[self.outbox.key, key("completed"), key("failed")],
            args=[key(""), self._rank, self.batch, now_ms() - ORPHAN_AFTER_MS],
        )
        self._rank = int(following)
        queued = 0
        for job_id in ended:
            try:
                queued += await self._queue_event(str(job_id))
            except _PASS_FAILURES:
                raise  # the whole pass waits for Redis
            except Exception:  # a bug in one job's event: the others still go
                log.exception("job %s: its webhook event could not be queued", job_id)
        return queued

    async def _queue_event(self, job_id: str) -> int:
        try:
            job = await self.store.fetch(job_id, with_logs=True)
        except JobNotFound:  # gone (or not ours) since the sweep saw it end
            await self.outbox.redis.zrem(self.outbox.key, job_id)
            return 0
        queued = 0
        delivery = self.delivery_for(job)
        if delivery is not None:
            await self.deliveries.add(delivery, self.retries)
            queued = 1
        await self.outbox.redis.zrem(self.outbox.key, job_id)
        return queued

    @staticmethod
    def delivery_for(job: StoredJob) -> Delivery | None:
        """The delivery of this ended job's event, or None if it subscribed to another kind."""
        webhook = job.data.webhook
        history = JobHistory(job)
        if webhook is None or not history.status.finished:
            return None
        kind, body = event_body(history)
        if kind not in webhook.events:
            return None
        return Delivery(
            event_id=event_id(job.id),
            job_id=job.id,
            tenant=job.data.tenant,
            type=kind,
            url=webhook.url,
            body=body,
        )

    async def run(self, interval_s: float) -> None:
        """Sweep every `interval_s` (at once again while a pass fills its batch) until
        cancelled; Redis trouble is logged and the next pass tries again."""
        while True:
            try:
                await self.sweep_once()
            except REDIS_TROUBLE as exc:
                log.warning("webhook sweep failed (%s); trying again", type(exc).__name__)
            except FlowError as exc:
                log.warning("webhook sweep failed: %s", exc)
            except Exception:  # a bug: said loudly, and the entries stay for the next pass
                log.exception("webhook sweep failed")
            if self._rank == 0:
                await asyncio.sleep(interval_s)
