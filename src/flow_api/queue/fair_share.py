"""Fair share between tenants: each tenant's waiting jobs are held in a line of its own, and
workers take from the lines in weighted round-robin, inside BullMQ's own take.

Why not one BullMQ queue per tenant: a bullmq `Worker` serves one queue (its lock renewal,
stalled-job check and job objects are all bound to it), so thousands of tenant queues would
need thousands of workers, or a port of those parts. Celery has no fair share of its own (the
usual answer, a queue per tenant class that workers consume in turn, has the same limit).
BullMQ Pro's groups keep one queue and pick the next group's job with a `ZPOPMIN` inside the
take script (O(log groups), its maintainers say); Hatchet's GROUP_ROUND_ROBIN rotates runs
between concurrency keys (A, B, C, A, B, C...) inside its engine. This module does the same on
bullmq's open-source scripts:

- `hold` (API side, just after bullmq's `add`): moves the new job from BullMQ's `wait` list (or
  `prioritized` set) into its tenant's line, `<prefix>:<queue>:fair:t:<tenant>`, a sorted set
  ordered like BullMQ orders jobs (by priority, then arrival), and puts the tenant in the ring,
  `<prefix>:<queue>:fair:ring`, if it was not there. A job a worker took in between is simply
  not found: it runs as a plain BullMQ job. So a crash between the two calls loses nothing.
- `release` (worker side): a few lines of Lua run inside bullmq's `moveToActive` and the
  fetch-next part of `moveToFinished`, just before they pop `wait`. Only when `wait` and
  `prioritized` are both empty (jobs queued before the upgrade, retries, jobs back from a rate
  budget wait and jobs handed back on shutdown go first, as before) it moves one job into `wait`:
  the head of the line of the ring's first tenant. The ring is a sorted set scored by virtual
  time (stride scheduling): the tenant served advances by `1 / weight`; a tenant that joins the
  ring starts at the virtual time of the last job released, so it is next, not owed a backlog.
  A take costs O(log tenants): no tenant line is polled.
- `<prefix>:<queue>:fair:waiting` is a list with one entry per held job, nothing else: its
  length is the number of held jobs, for autoscalers that read a list's length (KEDA's Redis
  scaler reads BullMQ's `wait` list, nearly empty now that jobs wait in tenant lines).

The job is a BullMQ job all along: its hash is bullmq's, under the queue's prefix, so status,
result and cancel find it by id alone, and Node tooling reads it with `Job.fromId`. While held
it is in no BullMQ state list, so BullMQ's counts (and `getState`, which answers "unknown")
do not show it; `flow-api`'s status reports it `waiting`. A Node BullMQ worker on this queue
would not take held jobs: run Flow API's workers (or set `FLOW_WORKER_FAIR_SHARE=false`).
The keys live under the queue's BullMQ prefix so that, on Redis Cluster with a hash-tagged
prefix, they share the queue's slot (the release script names them from the `wait` key).
"""

from __future__ import annotations

from collections.abc import Sequence

from redis.asyncio import Redis

PRIORITY_SPAN = 4_294_967_296
"""BullMQ scores a prioritized job `priority * 2**32 + counter`; tenant lines do the same, with
priority 0 (none) first as BullMQ takes `wait` before `prioritized`."""

# KEYS: wait, prioritized, ring, the tenant's line, strides, virtual time, sequence, gauge.
# ARGV: tenant, stride, then (job id, priority) pairs. Returns how many jobs were held.
_HOLD = """
local held = 0
for i = 3, #ARGV, 2 do
  local id, priority = ARGV[i], tonumber(ARGV[i + 1])
  local removed
  if priority > 0 then
    removed = redis.call("ZREM", KEYS[2], id)
  else
    removed = redis.call("LREM", KEYS[1], 1, id)
  end
  if removed == 1 then
    local seq = redis.call("INCR", KEYS[7]) % 4294967296
    redis.call("ZADD", KEYS[4], priority * 4294967296 + seq, id)
    redis.call("RPUSH", KEYS[8], "1")
    held = held + 1
  end
end
if held > 0 then
  redis.call("HSET", KEYS[5], ARGV[1], ARGV[2])
  if not redis.call("ZSCORE", KEYS[3], ARGV[1]) then
    redis.call("ZADD", KEYS[3], tonumber(redis.call("GET", KEYS[6]) or "0"), ARGV[1])
  end
end
return held
"""

# Defined ahead of bullmq's script text (whose `rcall` local does not exist yet here).
_RELEASE_FUNCTION = """
local function flowReleaseFair(waitKey, prioritizedKey)
  if redis.call("LLEN", waitKey) > 0 or redis.call("ZCARD", prioritizedKey) > 0 then return end
  local base = string.sub(waitKey, 1, -5)
  local ringKey = base .. "fair:ring"
  for _ = 1, 16 do
    local head = redis.call("ZRANGE", ringKey, 0, 0, "WITHSCORES")
    if #head == 0 then return end
    local tenant, tag = head[1], tonumber(head[2])
    local lineKey = base .. "fair:t:" .. tenant
    local popped = redis.call("ZPOPMIN", lineKey)
    if #popped > 0 then redis.call("LPOP", base .. "fair:waiting") end
    if redis.call("EXISTS", lineKey) == 0 then
      redis.call("ZREM", ringKey, tenant)
    else
      local stride = tonumber(redis.call("HGET", base .. "fair:stride", tenant)) or 1
      redis.call("ZADD", ringKey, tag + stride, tenant)
    end
    redis.call("SET", base .. "fair:vtime", tostring(tag))
    -- a held job removed by an operator (BullMQ's remove/obliterate) is skipped
    if #popped > 0 and redis.call("EXISTS", base .. popped[1]) == 1 then
      redis.call("RPUSH", waitKey, popped[1])
      return
    end
  end
end
"""

_TAKE_ANCHOR = 'local jobId = rcall("RPOPLPUSH", waitKey, activeKey)'

# Where each bullmq script pops `wait`, and its names for the wait and prioritized keys there.
_RELEASE_CALLS = {
    "moveToActive": "flowReleaseFair(waitKey, KEYS[3])\n",
    "moveToFinished": "flowReleaseFair(waitKey, prioritizedKey)\n",
}


def with_release(name: str, script: str) -> str:
    """bullmq's `moveToActive` or `moveToFinished` text with the fair release before its take.

    Raises `RuntimeError` if bullmq's text no longer has the one take this module expects (a
    bullmq upgrade changed it): better no worker than one that strands held jobs."""
    if script.count(_TAKE_ANCHOR) != 1:
        raise RuntimeError(f"bullmq's {name} script changed: cannot add the fair-share release")
    return _RELEASE_FUNCTION + script.replace(_TAKE_ANCHOR, _RELEASE_CALLS[name] + _TAKE_ANCHOR)


def line_key(queue_key: str, tenant: str) -> str:
    """A tenant's line; `queue_key` is the queue's own key prefix (`<prefix>:<queue>:`)."""
    return f"{queue_key}fair:t:{tenant}"


class FairShare:
    """The API side: hold newly added jobs in their tenant's line."""

    def __init__(self, redis: Redis, queue_key: str, weights: dict[str, float]) -> None:
        self._queue_key = queue_key
        self._weights = weights
        self._hold = redis.register_script(_HOLD)

    def stride(self, tenant: str) -> float:
        """How far a tenant's virtual time advances per job taken: 1 / its weight."""
        return 1.0 / self._weights.get(tenant, 1.0)

    async def hold(self, tenant: str, jobs: Sequence[tuple[str, int]]) -> int:
        """Move `(job id, priority)` jobs just added by bullmq into `tenant`'s line; returns
        how many were still waiting (a job a worker already took runs as it is)."""
        key = self._queue_key
        args: list[str | float | int] = [tenant, repr(self.stride(tenant))]
        for job_id, priority in jobs:
            args += [job_id, priority]
        reply = await self._hold(
            keys=[
                f"{key}wait",
                f"{key}prioritized",
                f"{key}fair:ring",
                line_key(key, tenant),
                f"{key}fair:stride",
                f"{key}fair:vtime",
                f"{key}fair:seq",
                f"{key}fair:waiting",
            ],
            args=args,
        )
        return int(reply)
