"""Fixtures for webhook tests: a loopback receiver (allow-listed) and settings that send to it
on a schedule shortened to fractions of a second."""

from __future__ import annotations

from collections.abc import AsyncIterator

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.jobs import DEFAULT_TENANT
from flow_api.queue.connection import connect
from flow_api.settings import Settings, WebhookSettings
from flow_api.webhooks.secrets import SecretStore
from tests.support import make_settings
from tests.webhooks.receiver import Receiver

FAST = WebhookSettings(
    allow_hosts=["127.0.0.1"], schedule_s=[0.1, 0.2, 0.3], jitter=0.2, sweep_interval_s=0.1
)


@pytest.fixture
def settings(valkey: EmbeddedValkey) -> Settings:
    return make_settings(valkey.url, webhook=FAST)


@pytest.fixture
async def receiver() -> AsyncIterator[Receiver]:
    hooks = Receiver()
    await hooks.start()
    yield hooks
    await hooks.stop()


async def rotate(settings: Settings, tenant: str = DEFAULT_TENANT) -> str:
    """A new signing secret for `tenant` (what `flow-api webhooks secret rotate` does)."""
    redis = connect(settings.redis)
    try:
        fresh = await SecretStore(redis, settings.redis.queue_name).rotate(
            tenant, settings.webhook.secret_grace_s
        )
    finally:
        await redis.aclose()
    return fresh.current


@pytest.fixture
async def secret(settings: Settings) -> str:
    """The default tenant's signing secret."""
    return await rotate(settings)
