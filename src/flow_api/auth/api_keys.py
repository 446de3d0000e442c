"""The API key store: keys are random 256-bit secrets, kept in Redis only as SHA-256 hashes.

A request's key is hashed and looked up in Redis on every request, so a revocation takes
effect at once on every API process, with no cache to invalidate (one GET per request).
"""

from __future__ import annotations

import hashlib
import secrets
from datetime import UTC, datetime, timedelta

from pydantic import BaseModel, ConfigDict, ValidationError
from redis.asyncio import Redis

from flow_api.auth.principal import Scope, check_tenant_name
from flow_api.errors import InvalidRequest
from flow_api.keys import api_key_index, api_key_record
from flow_api.queue.connection import redis_errors_as_unavailable

KEY_PREFIX = "flow_"
# 32 random bytes in URL-safe base64 are 43 characters.
_SECRET_CHARS = 43
MAX_NAME_CHARS = 100


class ApiKey(BaseModel):
    """What is stored about a key; never the key itself."""

    model_config = ConfigDict(frozen=True, extra="ignore")

    id: str
    tenant: str
    name: str
    scopes: frozenset[Scope]
    digest: str
    created_at: datetime
    expires_at: datetime | None = None
    requests_per_minute: int | None = None  # None: the service's FLOW_AUTH_ default
    tokens_per_day: int | None = None
    spend_per_day: float | None = None

    def expired(self, now: datetime | None = None) -> bool:
        return self.expires_at is not None and (now or datetime.now(UTC)) >= self.expires_at


def digest_of(plaintext: str) -> str:
    """The stored form of a key.

    A fast hash is right here, not bcrypt or argon2: those slow down guessing of low-entropy
    passwords, but our keys are 256-bit random strings that no amount of guessing finds, and the
    hash runs on every request, where a deliberately slow one would cost tens of milliseconds.
    """
    return hashlib.sha256(plaintext.encode()).hexdigest()


def well_formed(plaintext: str) -> bool:
    """True for strings shaped like our keys (checked before any Redis lookup)."""
    return (
        plaintext.startswith(KEY_PREFIX)
        and len(plaintext) == len(KEY_PREFIX) + _SECRET_CHARS
        and plaintext.isascii()
    )


class ApiKeyStore:
    """Create, find, list and revoke API keys of one deployment (one queue name)."""

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name

    async def create(
        self,
        tenant: str,
        name: str,
        scopes: frozenset[Scope],
        *,
        expires_in: timedelta | None = None,
        requests_per_minute: int | None = None,
        tokens_per_day: int | None = None,
        spend_per_day: float | None = None,
    ) -> tuple[ApiKey, str]:
        """A new key for `tenant`; returns its record and the plaintext, which is never stored
        and cannot be shown again."""
        if not name or len(name) > MAX_NAME_CHARS:
            raise InvalidRequest(f"name must be 1 to {MAX_NAME_CHARS} characters", field="name")
        if not scopes:
            raise InvalidRequest("a key needs at least one scope", field="scopes")
        plaintext = KEY_PREFIX + secrets.token_urlsafe(32)
        now = datetime.now(UTC).replace(microsecond=0)
        key = ApiKey(
            id=secrets.token_hex(8),
            tenant=check_tenant_name(tenant),
            name=name,
            scopes=scopes,
            digest=digest_of(plaintext),
            created_at=now,
            expires_at=now + expires_in if expires_in is not None else None,
            requests_per_minute=requests_per_minute,
            tokens_per_day=tokens_per_day,
            spend_per_day=spend_per_day,
        )
        record = key.model_dump_json()
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.hset(api_key_index(self.queue_name), key.id, record)
                # Redis drops an expiring key's record by itself; `find` checks the time too.
                pipe.set(
                    api_key_record(self.queue_name, key.digest),
                    record,
                    pxat=int(key.expires_at.timestamp() * 1000) if key.expires_at else None,
                )
                await pipe.execute()
        return key, plaintext

    async def find(self, plaintext: str) -> ApiKey | None:
        """The live key with this plaintext; None if unknown, revoked or expired."""
        if not well_formed(plaintext):
            return None
        with redis_errors_as_unavailable():
            raw = await self.redis.get(api_key_record(self.queue_name, digest_of(plaintext)))
        key = _parse(raw)
        return None if key is None or key.expired() else key

    async def list(self, tenant: str | None = None) -> list[ApiKey]:
        """Every key (expired ones included, until revoked), oldest first."""
        with redis_errors_as_unavailable():
            raw = await self.redis.hvals(api_key_index(self.queue_name))
        keys = [key for key in map(_parse, raw) if key is not None]
        return sorted(
            (k for k in keys if tenant is None or k.tenant == tenant),
            key=lambda k: (k.created_at, k.id),
        )

    async def revoke(self, key_id: str) -> ApiKey | None:
        """Remove the key; it is refused from the next request on. None if no such key."""
        index = api_key_index(self.queue_name)
        with redis_errors_as_unavailable():
            key = _parse(await self.redis.hget(index, key_id))
            if key is None:
                return None
            async with self.redis.pipeline(transaction=True) as pipe:
                pipe.delete(api_key_record(self.queue_name, key.digest))
                pipe.hdel(index, key_id)
                await pipe.execute()
        return key


def _parse(raw: str | bytes | None) -> ApiKey | None:
    if raw is None:
        return None
    try:
        return ApiKey.model_validate_json(raw)
    except ValidationError:
        return None
