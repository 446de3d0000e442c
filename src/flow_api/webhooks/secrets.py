"""Per-tenant webhook signing secrets, and the Standard Webhooks signature they make.

A tenant has one current secret (`whsec_` + base64 of 32 random bytes, the format Standard
Webhooks libraries take) and, for `FLOW_WEBHOOK_SECRET_GRACE_S` after a rotate, the previous
one: a delivery then carries both signatures (`webhook-signature: v1,<new> v1,<old>`, as the
specification allows), so receivers can switch secrets without losing a single event.
"""

from __future__ import annotations

import base64
import secrets
from dataclasses import dataclass
from datetime import UTC, datetime

from redis.asyncio import Redis
from standardwebhooks.webhooks import Webhook

from flow_api.jobs import now_ms
from flow_api.keys import webhook_secret_key

SECRET_PREFIX = "whsec_"


def new_secret() -> str:
    return SECRET_PREFIX + base64.b64encode(secrets.token_bytes(32)).decode()


@dataclass(frozen=True, slots=True)
class TenantSecrets:
    """The secrets that sign a tenant's deliveries now: the current one first."""

    current: str
    previous: str | None = None
    previous_until_ms: int | None = None

    def signing(self, now: int) -> list[str]:
        keys = [self.current]
        if self.previous and (self.previous_until_ms or 0) > now:
            keys.append(self.previous)
        return keys


def signature(secrets_: list[str], event_id: str, at: datetime, body: str) -> str:
    """The `webhook-signature` header: one `v1,<base64 HMAC-SHA256>` of `id.timestamp.body`
    per secret, space-separated (signed by the `standardwebhooks` library)."""
    return " ".join(Webhook(secret).sign(event_id, at, body) for secret in secrets_)


class SecretStore:
    """Tenants' secrets in Redis (`keys.webhook_secret_key`)."""

    def __init__(self, redis: Redis, queue_name: str) -> None:
        self.redis = redis
        self.queue_name = queue_name

    async def get(self, tenant: str) -> TenantSecrets | None:
        raw = await self.redis.hgetall(webhook_secret_key(self.queue_name, tenant))
        if not raw:
            return None
        fields = {_text(k): _text(v) for k, v in raw.items()}
        until = fields.get("previousUntil")
        return TenantSecrets(
            current=fields["current"],
            previous=fields.get("previous") or None,
            previous_until_ms=int(until) if until else None,
        )

    async def exists(self, tenant: str) -> bool:
        return bool(await self.redis.exists(webhook_secret_key(self.queue_name, tenant)))

    async def rotate(self, tenant: str, grace_s: int) -> TenantSecrets:
        """A new current secret; the one it replaces keeps signing for `grace_s` seconds."""
        key = webhook_secret_key(self.queue_name, tenant)
        before = await self.get(tenant)
        fresh = TenantSecrets(current=new_secret())
        fields = [("current", fresh.current)]
        if before is not None and grace_s > 0:
            fresh = TenantSecrets(fresh.current, before.current, now_ms() + grace_s * 1000)
            fields += [
                ("previous", before.current),
                ("previousUntil", str(fresh.previous_until_ms)),
            ]
        async with self.redis.pipeline(transaction=True) as pipe:
            pipe.delete(key)
            for name, value in fields:
                pipe.hset(key, name, value)
            await pipe.execute()
        return fresh


def _text(value: bytes | str) -> str:
    return value.decode() if isinstance(value, bytes) else value


def utc(ms: int) -> datetime:
    return datetime.fromtimestamp(ms / 1000, UTC)
