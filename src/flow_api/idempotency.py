"""Idempotent submit: the same `Idempotency-Key` and body give the same outcome, never a second job.

The first request with a key (the claimant) records a *pending* claim naming the job id it will
create, then reserves quota and enqueues. It then records its final outcome: *accepted* (the job
is queued; kept `FLOW_API_IDEMPOTENCY_TTL_S`) or *failed* (the error it answered; kept
`FAILED_TTL_S`, after which the key may be tried again). A replay answers with that outcome:
the 202 of a job that exists, or the claimant's very error. While the claim is pending it waits
(at most `REPLAY_WAIT_S`), and answers the 202 as soon as the named job exists, since a job
that exists was accepted. A claimant that crashed leaves a pending claim that expires after
`PENDING_TTL_S`; a replay that outwaits it gets 409 `idempotency_key_in_progress`.
"""

from __future__ import annotations

import asyncio
import hashlib
from collections.abc import Awaitable, Callable
from dataclasses import dataclass
from typing import Any

import orjson
from redis.asyncio import Redis

from flow_api.errors import (
    FlowError,
    IdempotencyConflict,
    IdempotencyInProgress,
    InvalidRequest,
    replayed_error,
)
from flow_api.keys import idempotency_key
from flow_api.queue.connection import redis_errors_as_unavailable

MAX_KEY_CHARS = 255
PENDING_TTL_S = 30
"""How long a claim may stay pending: far longer than a claimant's few Redis calls (each
bounded by the socket timeout), short enough that a crashed claimant frees its key quickly."""
FAILED_TTL_S = 10
"""How long a claimant's error is replayed: concurrent replays get it; a later retry with the
same key (the client was told the request failed) tries again."""
REPLAY_WAIT_S = 5.0
POLL_S = 0.025

# Record the claimant's outcome, only if the claim is still its own (same job id).
# KEYS: the record. ARGV: job id, new record, TTL.
_SETTLE = """
local current = redis.call("GET", KEYS[1])
if not current then return 0 end
if cjson.decode(current)["jobId"] ~= ARGV[1] then return 0 end
redis.call("SET", KEYS[1], ARGV[2], "EX", ARGV[3])
return 1
"""

JobExists = Callable[[str], Awaitable[bool]]


@dataclass(frozen=True, slots=True)
class Claim:
    """An idempotency key in use: `name` is its Redis key, `job_id` the job it stands for."""

    name: str
    job_id: str
    fingerprint: str


class IdempotencyStore:
    """Maps (scope, key) to the outcome of the first request that used it."""

    def __init__(self, redis: Redis, queue_name: str, ttl_s: int) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.ttl_s = ttl_s
        self._settle = redis.register_script(_SETTLE)

    def _key(self, scope: str, key: str) -> str:
        if not key or len(key) > MAX_KEY_CHARS:
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters",
                field="Idempotency-Key",
            )
        digest = hashlib.sha256(key.encode()).hexdigest()
        return idempotency_key(self.queue_name, scope, digest)

    async def claim(
        self, scope: str, key: str, body: bytes, job_id: str
    ) -> tuple[Claim, dict[str, Any] | None]:
        """Claim `key` for `job_id`. Returns the claim and None when this request is the
        claimant, or the earlier request's record when it is a replay; raises
        `IdempotencyConflict` if the key was used with another body."""
        name = self._key(scope, key)
        fingerprint = hashlib.sha256(body).hexdigest()
        pending = orjson.dumps({"state": "pending", "jobId": job_id, "body": fingerprint})
        while True:
            with redis_errors_as_unavailable():
                if await self.redis.set(name, pending, nx=True, ex=PENDING_TTL_S):
                    return Claim(name, job_id, fingerprint), None
                existing = await self.redis.get(name)
            if existing is not None:  # else it expired between the two calls: claim again
                break
        earlier: dict[str, Any] = orjson.loads(existing)
        if earlier.get("jobId") == job_id:  # our own claim: the client resent a lost reply
            return Claim(name, job_id, fingerprint), None
        if earlier["body"] != fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body",
                field="Idempotency-Key",
            )
        return Claim(name, str(earlier["jobId"]), fingerprint), earlier

    async def accepted(self, claim: Claim) -> None:
        """The claimant's job is queued: replays answer its 202 for the key's whole TTL."""
        record = {"state": "accepted", "jobId": claim.job_id, "body": claim.fingerprint}
        await self._record(claim, record, self.ttl_s)

    async def failed(self, claim: Claim, error: FlowError) -> None:
        """The claimant answered `error` (nothing was queued): replays answer the same error
        for `FAILED_TTL_S`; then the key is free again."""
        record = {
            "state": "failed",
            "jobId": claim.job_id,
            "body": claim.fingerprint,
            "error": {
                "status": error.status,
                "code": error.code,
                "message": error.message,
                "field": error.field,
                "headers": error.headers(),
            },
        }
        await self._record(claim, record, FAILED_TTL_S)

    async def _record(self, claim: Claim, record: dict[str, Any], ttl_s: int) -> None:
        with redis_errors_as_unavailable():
            await self._settle(keys=[claim.name], args=[claim.job_id, orjson.dumps(record), ttl_s])

    async def replay(self, claim: Claim, earlier: dict[str, Any], job_exists: JobExists) -> str:
        """The claimant's outcome for a replay: the id of its job (which exists), or its error
        raised again. Waits while the claim is pending, at most `REPLAY_WAIT_S`."""
        loop = asyncio.get_running_loop()
        deadline = loop.time() + REPLAY_WAIT_S
        record: dict[str, Any] | None = earlier
        while True:
            if record is None or record.get("body") != claim.fingerprint:
                break  # the claim expired (or another request now holds the key)
            state = record.get("state", "accepted")  # records from before states existed
            if state == "accepted":
                return str(record["jobId"])
            if state == "failed":
                raise replayed_error(record["error"])
            if await job_exists(str(record["jobId"])):
                return str(record["jobId"])  # queued: the claimant is recording it
            if loop.time() >= deadline:
                break
            await asyncio.sleep(POLL_S)
            with redis_errors_as_unavailable():
                raw = await self.redis.get(claim.name)
            record = orjson.loads(raw) if raw is not None else None
        raise IdempotencyInProgress(
            "a request with this Idempotency-Key is still being processed, or failed without "
            "an answer; retry shortly",
            field="Idempotency-Key",
        )
