"""Fixtures for access tests: an API with authentication on, keys made straight in the store,
and callers that send them."""

from __future__ import annotations

from collections.abc import AsyncIterator
from datetime import timedelta

import httpx
import pytest

from flow_api.auth.api_keys import ApiKey, ApiKeyStore
from flow_api.auth.principal import Scope
from flow_api.embedded import EmbeddedValkey
from flow_api.queue.connection import connect
from flow_api.settings import AuthSettings, ProviderSettings, Settings
from flow_api.testing.simulator import Simulator
from tests.support import Api, JobClient, make_settings, openai_on


@pytest.fixture
def auth_settings(request: pytest.FixtureRequest) -> AuthSettings:
    """Authentication on; other limits by `parametrize("auth_settings", [...], indirect=True)`."""
    chosen: AuthSettings = getattr(request, "param", AuthSettings(enabled=True))
    return chosen


def simulated_settings(
    valkey: EmbeddedValkey, sim: Simulator, auth: AuthSettings, provider_key: str
) -> Settings:
    """Test settings whose only provider is `openai`, answered by the simulator."""
    return make_settings(
        valkey.url,
        auth=auth,
        provider=ProviderSettings(default="openai", fake_enabled=False),
        openai=openai_on(sim.url, provider_key),
    )


@pytest.fixture
def settings(valkey: EmbeddedValkey, auth_settings: AuthSettings) -> Settings:
    return make_settings(valkey.url, auth=auth_settings)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Caller(JobClient):
    """One API key's view of the API."""

    def __init__(self, client: httpx.AsyncClient, key: str, record: ApiKey) -> None:
        super().__init__(client, bearer(key))
        self.key = key
        self.record = record


class KeyMaker:
    """Creates keys in the API's store and returns callers holding them."""

    def __init__(self, store: ApiKeyStore, api: Api) -> None:
        self.store = store
        self.api = api

    async def __call__(
        self,
        tenant: str = "acme",
        scopes: str = "submit,read",
        expires_in: timedelta | None = None,
        **limits: int,
    ) -> Caller:
        record, key = await self.store.create(
            tenant,
            "test",
            frozenset(Scope(s) for s in scopes.split(",")),
            expires_in=expires_in,
            **limits,
        )
        return Caller(self.api.client, key, record)


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ApiKeyStore]:
    redis = connect(settings.redis)
    yield ApiKeyStore(redis, settings.redis.queue_name)
    await redis.aclose()


@pytest.fixture
def caller(store: ApiKeyStore, api: Api) -> KeyMaker:
    return KeyMaker(store, api)
