"""Idempotent submit: the same `Idempotency-Key` and body give the same job, never a second one."""

from __future__ import annotations

import hashlib

import orjson
from redis.asyncio import Redis

from flow_api.errors import IdempotencyConflict, InvalidRequest
from flow_api.keys import idempotency_key
from flow_api.queue.connection import redis_errors_as_unavailable

MAX_KEY_CHARS = 255


class IdempotencyStore:
    """Maps (scope, key) to the job it created, for `ttl_s` seconds."""

    def __init__(self, redis: Redis, queue_name: str, ttl_s: int) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.ttl_s = ttl_s

    def _key(self, scope: str, key: str) -> str:
        if not key or len(key) > MAX_KEY_CHARS:
            raise InvalidRequest(
                f"Idempotency-Key must be 1 to {MAX_KEY_CHARS} characters",
                field="Idempotency-Key",
            )
        digest = hashlib.sha256(key.encode()).hexdigest()
        return idempotency_key(self.queue_name, scope, digest)

    async def claim(self, scope: str, key: str, body: bytes, job_id: str) -> str | None:
        """Reserve `key` for `job_id`. Returns the earlier job's id if the key was used with the
        same body; raises `IdempotencyConflict` if it was used with another body."""
        name = self._key(scope, key)
        fingerprint = hashlib.sha256(body).hexdigest()
        record = orjson.dumps({"jobId": job_id, "body": fingerprint})
        with redis_errors_as_unavailable():
            if await self.redis.set(name, record, nx=True, ex=self.ttl_s):
                return None
            existing = await self.redis.get(name)
        if existing is None:  # expired between the two calls: claim again
            return await self.claim(scope, key, body, job_id)
        earlier = orjson.loads(existing)
        if earlier["body"] != fingerprint:
            raise IdempotencyConflict(
                "this Idempotency-Key was already used with a different request body",
                field="Idempotency-Key",
            )
        return str(earlier["jobId"])

    async def release(self, scope: str, key: str) -> None:
        """Forget a claim whose job could not be enqueued, so a retry can succeed."""
        with redis_errors_as_unavailable():
            await self.redis.delete(self._key(scope, key))
