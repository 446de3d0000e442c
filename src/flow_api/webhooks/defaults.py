"""Tenants' default webhooks: the subscription a job gets when it names none itself.

Set by an admin (`flow-api webhooks default set --tenant T --url U`), read by the API at submit
through a small per-process cache (`FLOW_WEBHOOK_DEFAULT_CACHE_S`, 5 s by default: a changed
default applies to jobs submitted from a few seconds later, and submits cost no extra round trip
meanwhile).
"""

from __future__ import annotations

import time

from pydantic import ValidationError
from redis.asyncio import Redis

from flow_api.keys import webhook_defaults_key
from flow_api.models import WebhookOptions


class DefaultWebhooks:
    """`keys.webhook_defaults_key`: tenant -> `WebhookOptions` JSON."""

    def __init__(self, redis: Redis, queue_name: str, cache_s: float = 0.0) -> None:
        self.redis = redis
        self.key = webhook_defaults_key(queue_name)
        self.cache_s = cache_s
        self._cache: dict[str, tuple[float, WebhookOptions | None]] = {}

    async def get(self, tenant: str) -> WebhookOptions | None:
        """The tenant's default, read at most once per `cache_s` by this process."""
        now = time.monotonic()
        cached = self._cache.get(tenant)
        if cached is not None and cached[0] > now:
            return cached[1]
        raw = await self.redis.hget(self.key, tenant)
        found = None
        if raw is not None:
            try:
                found = WebhookOptions.model_validate_json(raw)
            except ValidationError:  # written by a newer version: ignored, not a 500
                found = None
        if self.cache_s > 0:
            self._cache[tenant] = (now + self.cache_s, found)
        return found

    async def set(self, tenant: str, webhook: WebhookOptions) -> None:
        await self.redis.hset(self.key, tenant, webhook.model_dump_json(by_alias=True))
        self._cache.pop(tenant, None)

    async def clear(self, tenant: str) -> bool:
        self._cache.pop(tenant, None)
        return bool(await self.redis.hdel(self.key, tenant))

    async def all(self) -> dict[str, WebhookOptions]:
        raw = await self.redis.hgetall(self.key)
        found = {}
        for tenant, value in raw.items():
            name = tenant.decode() if isinstance(tenant, bytes) else tenant
            try:
                found[name] = WebhookOptions.model_validate_json(value)
            except ValidationError:
                continue
        return found
