"""Every Redis name Flow API adds beside BullMQ's own keys, in one place.

BullMQ owns `<prefix>:<queue>:*`. Flow API adds:

- `flow:<queue>:idem:<scope>:<sha256>` (string): an idempotency record; TTL
  `FLOW_API_IDEMPOTENCY_TTL_S`.
- `flow:<queue>:cancel` (pub/sub channel): cancel requests to the worker holding a job.
- `flowCancelledAt` (a field in a job's own BullMQ hash): removed with the job.
- `flow:<queue>:auth:key:<sha256>` (string): an API key's record, found by the hash of the key;
  expires with the key, else kept until `flow-api keys revoke`.
- `flow:<queue>:auth:keys` (hash): key id -> record, for `flow-api keys list/revoke`; owned by
  that CLI.
- `flow:<queue>:auth:rate:*` (lists, from the `limits` library): per-key submit windows; TTL
  `FLOW_AUTH_RATE_WINDOW_S`.
- `flow:<queue>:auth:tokens:<keyId>:<window>` (string): tokens reserved and used in one quota
  window; TTL two windows.
"""

from __future__ import annotations

CANCEL_FIELD = "flowCancelledAt"


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
    return f"flow:{queue_name}:auth:tokens:{key_id}:{window}"
