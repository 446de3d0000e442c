"""Every Redis name Flow API adds beside BullMQ's own keys, in one place.

BullMQ owns `<prefix>:<queue>:*`. Flow API adds:

- `flow:<queue>:idem:<scope>:<sha256>` (string): an idempotency record; TTL
  `FLOW_API_IDEMPOTENCY_TTL_S`.
- `flow:<queue>:cancel` (pub/sub channel): cancel requests to the worker holding a job.
- `flowCancelledAt` (a field in a job's own BullMQ hash): removed with the job.
"""

from __future__ import annotations

CANCEL_FIELD = "flowCancelledAt"


def cancel_channel(queue_name: str) -> str:
    return f"flow:{queue_name}:cancel"


def idempotency_key(queue_name: str, scope: str, digest: str) -> str:
    return f"flow:{queue_name}:idem:{scope}:{digest}"
