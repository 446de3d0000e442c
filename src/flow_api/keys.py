"""Every Redis name Flow API adds beside BullMQ's own keys, in one place.

BullMQ owns `<prefix>:<queue>:*`. Flow API adds:

- `flow:<queue>:idem:<scope>:<sha256>` (string): an idempotency record; TTL
  `FLOW_API_IDEMPOTENCY_TTL_S`.
- `flow:<queue>:cancel` (pub/sub channel): cancel requests to the worker holding a job.
- `flowCancelledAt` (a field in a job's own BullMQ hash): the cancel flag; removed with the job.
- `flowStartedAt` (a field in a job's own hash): when an attempt first started (a job that
  started once is never expired); removed with the job.
- `flowFinishing` (a field in a job's own hash): a worker decided to finish the job (the
  decision a cancel loses to); cleared when another attempt starts; removed with the job.
- `flow:<queue>:auth:key:<sha256>` (string): an API key's record, found by the hash of the key;
  expires with the key, else kept until `flow-api keys revoke`.
- `flow:<queue>:auth:keys` (hash): key id -> record, for `flow-api keys list/revoke`; owned by
  that CLI.
- `flow:<queue>:auth:rate:*` (lists, from the `limits` library): per-key submit windows; TTL
  `FLOW_AUTH_RATE_WINDOW_S`.
- `flow:<queue>:auth:tokens:{<keyId>}:<window>` (string): tokens reserved and used in one quota
  window; TTL two windows.
- `flow:<queue>:auth:tokens:{<keyId>}:<window>:jobs` (hash): job id -> tokens its reservation,
  then its settle, holds, so a reserve sent twice or a job settled twice (run again after a
  crash) counts once; TTL two windows. The hash tag keeps both in one Redis Cluster slot.
- `flow:<queue>:budget:{<provider>/<model>}` (hash): a model's shared rate budget (next free
  request and token times, cooldown after a 429); TTL refreshed on use, a few minutes past the
  last reservation (see `budget/`).
- `flow:<queue>:worker:<host>:<pid>` (string): a worker process's heartbeat (its live slot
  count, see `heartbeat.py`); TTL a few seconds, refreshed while the worker runs.
- `flow:<queue>:budget:{<provider>/<model>}:r:<jobId>` (string): the start time reserved for a
  job put back to wait for budget; TTL its wait plus two minutes.
- `flow:<queue>:budget:{<provider>/<model>}:known` (hash): what the model's answers taught
  (limits from its headers, prompt tokens per character, average completion); TTL an hour,
  refreshed by each answer.
- `flow:<queue>:budget:{<provider>/<model>}:probe` (string): the one call that may go while
  nothing is known of a model; TTL two seconds. The hash tag keeps a model's keys in one Redis
  Cluster slot, as its Lua scripts need.
- `flow:<queue>:admission:refused` (hash): tenant -> submits refused with `queue_full` (see
  `queue/admission.py`); one field per tenant, kept for the metrics to export.
- `flow:<queue>:budget:{<provider>/<model>}:wake:<tenant>` (string): when the tenant's next job
  told to come back for that model's budget comes back (each tenant has its own line of
  come-back times, so one tenant's backlog does not push another's back); TTL like the budget.
- `<prefix>:<queue>:fair:ring` (sorted set: tenant -> virtual time),
  `<prefix>:<queue>:fair:t:<tenant>` (sorted set: the tenant's held job ids),
  `<prefix>:<queue>:fair:stride` (hash: tenant -> 1 / weight), `<prefix>:<queue>:fair:vtime` and
  `<prefix>:<queue>:fair:seq` (strings), `<prefix>:<queue>:fair:waiting` (list, one entry per
  held job: a length for autoscalers): fair share between tenants (`queue/fair_share.py`).
  Under BullMQ's prefix so they share the queue's Cluster slot; owned by the queue (a line
  empties as its jobs are taken; `obliterate` removes them all).
- `flow:<queue>:usage:{<tenant>}:<YYYY-MM-DD>` (hash): a tenant's usage that UTC day, fields
  `m:<provider>/<model>:<jobs|prompt|completion|cost>` and `k:<keyId>:...` (cost in millionths
  of the currency); TTL `FLOW_USAGE_RETENTION_DAYS` (see `observability/usage.py`).
- `flow:<queue>:auth:spend:{<keyId>}:<window>` (string) and `...:jobs` (hash): a key's spend
  cap ledger in millionths of the currency, as the token quota's above; TTL two windows.
- `flow:<queue>:file:<fileId>` (hash: tenant, name, purpose, size, lines, created) and
  `flow:<queue>:file:<fileId>:chunks` (list of byte pieces): a `/v1/files` file; TTL
  `FLOW_WORKER_RETENTION_S` (`batch/files.py`).
- `<prefix>:<queue>:batch:<batchId>` (hash): a batch, its status, counts and enqueue cursor;
  kept until it ends, then TTL `FLOW_WORKER_RETENTION_S`. Under BullMQ's prefix, because the
  tally run at each line's end (`batch/tally.py`) updates it in one script with the job's hash.
  Beside it `…:lease` (string): the API process driving it; TTL `FLOW_BATCH_LEASE_S`; and
  `…:refused` (hash: line -> error): lines refused at enqueue (a key's token quota); TTL as
  the batch's once it ends.
- `<prefix>:<queue>:batches:<tenant>` (sorted set: batch id -> created ms): a tenant's batches,
  for `GET /v1/batches`; an entry whose batch expired is dropped when a listing meets it.
- `<prefix>:<queue>:batches:work` (sorted set: batch id -> due ms): batches with driver work
  left (validate, enqueue, cancel, assemble output); owned by the API processes' drivers.
- `flowBatchTallied` (a field in a batch job's own hash): its end was counted in its batch's
  tally, so a second count is a no-op; removed with the job.
- `<prefix>:<queue>:<jobId>:stream` (stream): the job's events for `GET /api/ai/stream`
  (`streaming/`); TTL the job retention, refreshed by each write; bounded per attempt
  (`FLOW_STREAM_MAX_EVENTS`).
- `<prefix>:<queue>:<jobId>:watched` (string): a client opened the job's stream before it
  ended, so its attempts stream tokens from the provider (`FLOW_STREAM_TOKENS=watched`); TTL a
  day at most (the job retention if shorter), set again by each new watcher.
- `<prefix>:<queue>:index:<tenant>` (sorted set, members `<created ms, 13 digits>:<jobId>`):
  the tenant's jobs, newest last, for `GET /api/ai/jobs` (`listing.py`); entries older than the
  retention are trimmed at each insert, and the key expires a retention after the last one.
- `flow:<queue>:webhooks:secret:<tenant>` (hash: current, previous, previousUntil): a tenant's
  webhook signing secrets; owned by `flow-api webhooks secret rotate` (kept until then).
- `flow:<queue>:webhooks:defaults` (hash: tenant -> subscription JSON): tenants' default
  webhooks; owned by `flow-api webhooks default set/clear`.
- `<prefix>:<queue>:webhooks:pending` (sorted set: job id -> submit ms): jobs with a webhook
  whose ending has not yet been queued for delivery (the outbox, see `webhooks/outbox.py`); an
  entry leaves once its delivery is queued, or once its job is gone. Under BullMQ's prefix so
  the sweep's script reads it with the queue's own sets in one Cluster slot.
- `<prefix>:<queue>-webhooks:*`: the BullMQ queue of deliveries (one job per event, id
  `evt_<jobId>`), kept like jobs (`FLOW_WORKER_RETENTION_S`).
"""

from __future__ import annotations

CANCEL_FIELD = "flowCancelledAt"
STARTED_FIELD = "flowStartedAt"
FINISHING_FIELD = "flowFinishing"


def cancel_channel(queue_name: str) -> str:
    return f"flow:{queue_name}:cancel"


def idempotency_key(queue_name: str, scope: str, digest: str) -> str:
    return f"flow:{queue_name}:idem:{scope}:{digest}"


def api_key_record(queue_name: str, digest: str) -> str:
    return f"flow:{queue_name}:auth:key:{digest}"


def api_key_index(queue_name: str) -> str:
    return f"flow:{queue_name}:auth:keys"


def rate_limit_prefix(queue_name: str) -> str:
    return f"flow:{queue_name}:auth:rate"


def token_quota_key(queue_name: str, key_id: str, window: int) -> str:
    return f"flow:{queue_name}:auth:tokens:{{{key_id}}}:{window}"


def token_jobs_key(queue_name: str, key_id: str, window: int) -> str:
    return f"{token_quota_key(queue_name, key_id, window)}:jobs"


def budget_key(queue_name: str, provider: str, model: str) -> str:
    return f"flow:{queue_name}:budget:{{{provider}/{model}}}"


def budget_reservation_key(queue_name: str, provider: str, model: str, job_id: str) -> str:
    return f"{budget_key(queue_name, provider, model)}:r:{job_id}"


def worker_heartbeat_key(queue_name: str, worker: str) -> str:
    return f"flow:{queue_name}:worker:{worker}"


def worker_heartbeat_pattern(queue_name: str) -> str:
    return f"flow:{queue_name}:worker:*"


def budget_known_key(queue_name: str, provider: str, model: str) -> str:
    return f"{budget_key(queue_name, provider, model)}:known"


def budget_probe_key(queue_name: str, provider: str, model: str) -> str:
    return f"{budget_key(queue_name, provider, model)}:probe"


def admission_refusals_key(queue_name: str) -> str:
    return f"flow:{queue_name}:admission:refused"


def budget_wake_key(queue_name: str, provider: str, model: str, tenant: str) -> str:
    return f"{budget_key(queue_name, provider, model)}:wake:{tenant}"


def usage_day_key(queue_name: str, tenant: str, day: str) -> str:
    return f"flow:{queue_name}:usage:{{{tenant}}}:{day}"


def spend_key(queue_name: str, key_id: str, window: int) -> str:
    return f"flow:{queue_name}:auth:spend:{{{key_id}}}:{window}"


def spend_jobs_key(queue_name: str, key_id: str, window: int) -> str:
    return f"{spend_key(queue_name, key_id, window)}:jobs"


BATCH_TALLIED_FIELD = "flowBatchTallied"


def file_key(queue_name: str, file_id: str) -> str:
    return f"flow:{queue_name}:file:{file_id}"


def file_chunks_key(queue_name: str, file_id: str) -> str:
    return f"{file_key(queue_name, file_id)}:chunks"


def batch_suffix(batch_id: str) -> str:
    """A batch's hash, relative to the queue's BullMQ prefix (`Queue.toKey`)."""
    return f"batch:{batch_id}"


def batch_lease_suffix(batch_id: str) -> str:
    return f"batch:{batch_id}:lease"


def tenant_batches_suffix(tenant: str) -> str:
    return f"batches:{tenant}"


BATCH_WORK_SUFFIX = "batches:work"


def job_stream_key(prefix: str, queue_name: str, job_id: str) -> str:
    return f"{prefix}:{queue_name}:{job_id}:stream"


def job_index_key(prefix: str, queue_name: str, tenant: str) -> str:
    return f"{prefix}:{queue_name}:index:{tenant}"


def job_watched_key(prefix: str, queue_name: str, job_id: str) -> str:
    return f"{prefix}:{queue_name}:{job_id}:watched"


def webhook_secret_key(queue_name: str, tenant: str) -> str:
    return f"flow:{queue_name}:webhooks:secret:{tenant}"


def webhook_defaults_key(queue_name: str) -> str:
    return f"flow:{queue_name}:webhooks:defaults"


def webhook_pending_key(prefix: str, queue_name: str) -> str:
    return f"{prefix}:{queue_name}:webhooks:pending"


def webhook_queue_name(queue_name: str) -> str:
    """The BullMQ queue of webhook deliveries beside the job queue `queue_name`."""
    return f"{queue_name}-webhooks"
