"""The worker's part of a batch: count each line's job once it has ended, in one script.

Run by the slot worker right after it finished a job (`SlotWorker.settled_hook`): completed,
or failed for good (a failure that will be retried leaves the job in neither set and counts
nothing). The script reads the job's state, flags the job counted (`flowBatchTallied` in its
own hash, so a finish retried after a lost reply counts once) and bumps the batch's counter;
the one that makes `completed + failed = total` marks the batch ready and hands it to an API
process's driver for its output. So a batch's end is seen without polling any job.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from flow_api.batch.store import READY, now_s
from flow_api.keys import BATCH_TALLIED_FIELD, BATCH_WORK_SUFFIX, batch_suffix

# KEYS: batch hash, job hash, completed set, failed set, work set.
# ARGV: job id, now (s), batch id, tallied field. Returns 1 when this end readied the batch.
_TALLY = (
    READY
    + """
if redis.call("EXISTS", KEYS[1]) == 0 or redis.call("EXISTS", KEYS[2]) == 0 then return 0 end
local state
if redis.call("ZSCORE", KEYS[3], ARGV[1]) then
  state = "completed"
elseif redis.call("ZSCORE", KEYS[4], ARGV[1]) then
  state = "failed"
else
  return 0
end
if redis.call("HSETNX", KEYS[2], ARGV[4], "1") == 0 then return 0 end
redis.call("HINCRBY", KEYS[1], state, 1)
return flowBatchReady(KEYS[1], KEYS[5], ARGV[2], ARGV[3])
"""
)


class BatchTally:
    """Counts ended batch jobs; `client` and `to_key` are the slot worker's (bullmq's keys)."""

    def __init__(self, client: Any, to_key: Callable[[str], str]) -> None:
        self._script = client.register_script(_TALLY)
        self._key = to_key

    async def settled(self, job_id: str, data: Any) -> None:
        """Count the job if it runs a batch line and has ended; nothing otherwise."""
        batch = data.get("batch") if isinstance(data, dict) else None
        if not isinstance(batch, dict) or not isinstance(batch.get("id"), str):
            return
        key = self._key
        await self._script(
            keys=[
                key(batch_suffix(batch["id"])),
                key(job_id),
                key("completed"),
                key("failed"),
                key(BATCH_WORK_SUFFIX),
            ],
            args=[job_id, now_s(), batch["id"], BATCH_TALLIED_FIELD],
        )
