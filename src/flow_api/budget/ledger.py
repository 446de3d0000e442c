"""The shared ledger in Redis: two Lua scripts, one before a call and one after it.

Each dimension `d` (requests, tokens, input, output; see `dimensions.py`) keeps a *theoretical
arrival time* in the model's budget hash (GCRA, the generic cell rate algorithm): the earliest
time the next call may start as far as `d` goes. A call starting at `s` moves it to
`s + charge * 60 s / limit` (the limit scaled down by `FLOW_BUDGET_HEADROOM`), so calls are
spaced evenly at the limit, never bunched, from every worker together.

`before` (acquire): read the cooldown and what is known of the model; while nothing is known,
let one *probe* call go and hold the rest until its answer teaches the limits; otherwise find
the start time, reserve it, and say whether to go now or come back (`go` 1 / 0), or that the job
may not be put back again and nothing was reserved (-1).

`after` (settle): correct each dimension by what the provider really charged (a failed call
gives its tokens back at once), learn the limits the answer's headers state and the decaying
averages of its usage, let the provider's `remaining` count push a dimension back when it says
less is left than the next call needs, and set a cooldown after a 429.

No charge or correction moves a dimension more than one minute (the limit's window) ahead.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from redis.asyncio import Redis

from flow_api.budget.dimensions import Amounts

MINUTE_MS = 60_000
KEEP_MS = 120_000  # budget hashes outlive their last reservation by this much
KNOWN_TTL_MS = 3_600_000  # what answers taught is kept an hour past the last answer
PROBE_MS = 2_000  # how long the one probe call holds the others back at most
PROBE_POLL_MS = 500  # how often jobs held back by a probe look again

# KEYS: budget hash, this job's reservation, known hash, probe, the tenant's come-back time.
# ARGV: now, 4 configured limits (-1: not configured), 4 charges, share, inline, keep, horizon,
#       may_defer, probe_ms, poll_ms, known_ttl, the tenant's stride (1 / its weight).
# Returns {go, start, 4 effective limits, per_char, completion, probe}.
_BEFORE = """
local now = tonumber(ARGV[1])
local share, inline = tonumber(ARGV[10]), tonumber(ARGV[11])
local keep, horizon, may_defer = tonumber(ARGV[12]), tonumber(ARGV[13]), tonumber(ARGV[14])
local probe_ms, poll_ms, known_ttl = tonumber(ARGV[15]), tonumber(ARGV[16]), tonumber(ARGV[17])
local known = redis.call("HMGET", KEYS[3], "lr", "lt", "li", "lo", "pc", "cp", "seen", "probed")
local dims = {"r", "t", "i", "o"}
local limits, any = {}, false
for d = 1, 4 do
  local configured = tonumber(ARGV[1 + d])
  if configured >= 0 then limits[d] = configured else limits[d] = tonumber(known[d]) or 0 end
  if limits[d] > 0 then any = true end
end
local probe = 0
local function answer(go, at)
  return {go, math.floor(at), limits[1], limits[2], limits[3], limits[4],
          known[5] or "", known[6] or "", probe}
end
local function later(at)
  if may_defer == 1 then return answer(0, at) end
  return answer(-1, at)
end
local state = redis.call("HMGET", KEYS[1], "r", "t", "i", "o", "cool")
local cool = tonumber(state[5]) or 0
local reserved = tonumber(redis.call("GET", KEYS[2]) or "")
if reserved then
  if now >= cool and now + inline >= reserved then
    redis.call("DEL", KEYS[2])
    return answer(1, reserved)
  end
  if now >= cool then return answer(0, reserved) end
  redis.call("DEL", KEYS[2])  -- its slot fell inside a cooldown: take a fresh one
end
if now < cool then return later(cool) end
if not known[7] then
  -- Nothing known of this model yet: one call goes and its answer teaches every worker.
  local holder = tonumber(redis.call("GET", KEYS[4]) or "")
  if holder then return later(math.min(holder, now + poll_ms)) end
  if known[8] then
    redis.call("HSET", KEYS[3], "seen", now)  -- a probe went unanswered: stop holding back
  else
    probe = 1
    redis.call("HSET", KEYS[3], "probed", now)
    redis.call("PEXPIRE", KEYS[3], known_ttl)
    redis.call("SET", KEYS[4], now + probe_ms, "PX", probe_ms)
  end
end
if not any then return answer(1, now) end
local start, widest, steps = now, 0, {}
for d = 1, 4 do
  if limits[d] > 0 then
    local tat = tonumber(state[d]) or 0
    if tat > start then start = tat end
    steps[d] = math.min(tonumber(ARGV[5 + d]) * MINUTE / (limits[d] * share), MINUTE)
    if steps[d] > widest then widest = steps[d] end
  end
end
if start - now > horizon then
  if may_defer == 0 then return answer(-1, start) end
  -- Too far ahead to hold a place (it would be priced with today's estimate): come back about
  -- half a horizon before it, spaced a little tighter than the budget, and reserve then.
  -- Each tenant has its own line of come-back times (KEYS[5]), spaced by its stride (1 /
  -- weight): returning jobs of every tenant with a backlog interleave, so a tenant whose
  -- backlog told thousands of jobs to come back does not push another tenant's jobs behind them.
  local wake = math.max(tonumber(redis.call("GET", KEYS[5]) or "") or 0, start - horizon / 2)
  local ttl = math.ceil(math.max(start, wake) - now + keep)
  redis.call("SET", KEYS[5], wake + 0.75 * widest * tonumber(ARGV[18]), "PX", ttl)
  redis.call("PEXPIRE", KEYS[1], ttl)
  return answer(0, wake)
end
if start - now > inline and may_defer == 0 then return answer(-1, start) end
local last = start
for d = 1, 4 do
  if steps[d] then
    redis.call("HSET", KEYS[1], dims[d], start + steps[d])
    if start + steps[d] > last then last = start + steps[d] end
  end
end
redis.call("PEXPIRE", KEYS[1], math.ceil(last - now + keep))
if start - now <= inline then return answer(1, start) end
redis.call("SET", KEYS[2], start, "PX", math.ceil(start - now + keep))
return answer(0, start)
""".replace("MINUTE", str(MINUTE_MS))

# KEYS: budget hash, known hash, probe.
# ARGV: now, keep, known_ttl, share, answered, release_probe, cool_until, chars, prompt tokens
#       (-1: unknown), completion tokens (-1: unknown), decay, learn_limits; then per dimension:
#       limit charged against, correction, stated limit (0: none), remaining (-1), reset ms (-1),
#       next call's charge.
# Returns the cooldown's end (0: none).
_AFTER = """
local now, keep, known_ttl = tonumber(ARGV[1]), tonumber(ARGV[2]), tonumber(ARGV[3])
local share, answered, release = tonumber(ARGV[4]), tonumber(ARGV[5]), tonumber(ARGV[6])
local cool_until, chars = tonumber(ARGV[7]), tonumber(ARGV[8])
local prompt, completion, decay = tonumber(ARGV[9]), tonumber(ARGV[10]), tonumber(ARGV[11])
local learn = tonumber(ARGV[12])
local dims = {"r", "t", "i", "o"}
local furthest = 0
local function push(d, tat)
  redis.call("HSET", KEYS[1], dims[d], tat)
  if tat > furthest then furthest = tat end
end
for d = 1, 4 do
  local base = 12 + (d - 1) * 6
  local limit, delta = tonumber(ARGV[base + 1]), tonumber(ARGV[base + 2])
  local stated, remaining = tonumber(ARGV[base + 3]), tonumber(ARGV[base + 4])
  local reset, low = tonumber(ARGV[base + 5]), tonumber(ARGV[base + 6])
  if limit > 0 and delta ~= 0 and redis.call("EXISTS", KEYS[1]) == 1 then
    local tat = tonumber(redis.call("HGET", KEYS[1], dims[d]) or "0") or 0
    if delta > 0 then tat = math.max(tat, now) end
    local step = delta * MINUTE / (limit * share)
    step = math.max(math.min(step, MINUTE), -MINUTE)
    push(d, math.max(tat + step, now))
  end
  if stated > 0 then
    if learn == 1 then redis.call("HSET", KEYS[2], "l" .. dims[d], stated) end
    if remaining >= 0 and remaining < low then
      -- The provider's count is the truth: it has less left than the next call needs, so no
      -- call goes until it has refilled that much (or has reset, if that is sooner).
      local wait = (low - remaining) * MINUTE / stated
      if reset >= 0 then wait = math.min(wait, reset) end
      wait = math.min(wait, MINUTE)
      local tat = tonumber(redis.call("HGET", KEYS[1], dims[d]) or "0") or 0
      if now + wait > tat then push(d, now + wait) end
    end
  end
end
if cool_until > 0 then
  local cool = math.max(tonumber(redis.call("HGET", KEYS[1], "cool") or "0") or 0, cool_until)
  redis.call("HSET", KEYS[1], "cool", cool)
  cool_until = cool
  if cool > furthest then furthest = cool end
end
if furthest > 0 then
  local ttl = math.ceil(furthest - now + keep)
  if redis.call("PTTL", KEYS[1]) < ttl then redis.call("PEXPIRE", KEYS[1], ttl) end
end
if answered == 1 then
  local known = redis.call("HMGET", KEYS[2], "pc", "cp")
  if prompt > 0 and chars > 0 then
    local seen = prompt / chars
    local was = tonumber(known[1] or "")
    if was then seen = was + decay * (seen - was) end
    redis.call("HSET", KEYS[2], "pc", tostring(seen))
  end
  if completion >= 0 then
    local was = tonumber(known[2] or "")
    local avg = completion
    if was then avg = was + decay * (completion - was) end
    redis.call("HSET", KEYS[2], "cp", tostring(avg))
  end
  redis.call("HSET", KEYS[2], "seen", now)
  redis.call("PEXPIRE", KEYS[2], known_ttl)
end
if release == 1 then
  redis.call("DEL", KEYS[3])
  if answered == 0 then redis.call("HDEL", KEYS[2], "probed") end
end
return math.floor(cool_until)
""".replace("MINUTE", str(MINUTE_MS))


@dataclass(frozen=True, slots=True)
class Decision:
    """What `before` decided: `go` 1 start at `start_ms`, 0 come back then, -1 may not wait."""

    go: int
    start_ms: int
    limits: Amounts
    per_char: float | None
    completion: float | None
    probe: bool


@dataclass(frozen=True, slots=True)
class Correction:
    """One dimension's part of `after`."""

    limit: int = 0  # the limit the call was charged against (0: none)
    delta: int = 0  # what to add to its charge (negative gives back)
    stated: int = 0  # the limit the answer's headers state (0: none)
    remaining: int = -1
    reset_ms: int = -1
    next_charge: int = 0  # what the next call will need of it

    def args(self) -> list[int]:
        return [
            self.limit,
            self.delta,
            self.stated,
            self.remaining,
            self.reset_ms,
            self.next_charge,
        ]


class Ledger:
    """The two scripts, registered on a Redis client."""

    def __init__(self, redis: Redis) -> None:
        self._before = redis.register_script(_BEFORE)
        self._after = redis.register_script(_AFTER)

    async def before(self, keys: list[str], args: list[Any]) -> Decision:
        raw = await self._before(keys=keys, args=args)
        return Decision(
            go=int(raw[0]),
            start_ms=int(raw[1]),
            limits=Amounts(*(int(v) for v in raw[2:6])),
            per_char=_float(raw[6]),
            completion=_float(raw[7]),
            probe=bool(int(raw[8])),
        )

    async def after(self, keys: list[str], args: list[Any]) -> int:
        return int(await self._after(keys=keys, args=args))


def _float(value: Any) -> float | None:
    if isinstance(value, bytes):
        value = value.decode()
    try:
        return float(value) if value not in (None, "") else None
    except (TypeError, ValueError):
        return None
