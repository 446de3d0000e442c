"""The API's side of webhooks: which subscription a submitted job gets, checked at submit."""

from __future__ import annotations

from redis.asyncio import Redis

from flow_api.errors import WebhookSecretMissing
from flow_api.keys import webhook_pending_key
from flow_api.models import WebhookOptions
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.settings import RedisSettings, WebhookSettings
from flow_api.webhooks.address import AllowList, check_url
from flow_api.webhooks.defaults import DefaultWebhooks
from flow_api.webhooks.outbox import Outbox
from flow_api.webhooks.secrets import SecretStore


class Subscriptions:
    """Resolves a job's webhook (its own `options.webhook`, else its tenant's default) and
    registers it in the outbox before the job is queued."""

    def __init__(self, redis: Redis, redis_settings: RedisSettings, settings: WebhookSettings):
        queue_name = redis_settings.queue_name
        self.allow = AllowList.parse(settings.allow_hosts)
        self.defaults = DefaultWebhooks(redis, queue_name, settings.default_cache_s)
        self.secrets = SecretStore(redis, queue_name)
        self.outbox = Outbox(redis, webhook_pending_key(redis_settings.prefix, queue_name))

    async def resolve(self, tenant: str, requested: WebhookOptions | None) -> WebhookOptions | None:
        """The job's subscription, or None. A requested URL is checked now (422
        `webhook_url_refused`); a tenant without a secret cannot subscribe (422
        `webhook_secret_missing`): nobody could verify what it would be sent."""
        with redis_errors_as_unavailable():
            webhook = requested or await self.defaults.get(tenant)
            if webhook is None:
                return None
            if not await self.secrets.exists(tenant):
                raise WebhookSecretMissing(
                    f"tenant {tenant!r} has no webhook signing secret yet; an admin creates one "
                    f"with `flow-api webhooks secret rotate --tenant {tenant}`",
                    field="options.webhook",
                )
        if requested is not None:  # after the cheap refusals: this one may ask DNS
            await check_url(requested.url, self.allow)
        return webhook

    async def register(self, job_id: str) -> None:
        with redis_errors_as_unavailable():
            await self.outbox.register(job_id)
