"""Fixtures for access tests: an API with authentication on, keys made straight in the store,
and callers that send them."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
import sys
from collections.abc import AsyncIterator
from datetime import timedelta
from typing import Any

import httpx
import pytest

from flow_api.auth.api_keys import ApiKey, ApiKeyStore
from flow_api.auth.principal import Scope
from flow_api.embedded import EmbeddedValkey
from flow_api.queue import connect
from flow_api.settings import AuthSettings, OpenAISettings, ProviderSettings, Settings
from flow_api.testing.simulator import Simulator
from tests.conftest import Api, make_settings


@pytest.fixture
def auth_settings(request: pytest.FixtureRequest) -> AuthSettings:
    """Authentication on; other limits by `parametrize("auth_settings", [...], indirect=True)`."""
    chosen: AuthSettings = getattr(request, "param", AuthSettings(enabled=True))
    return chosen


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    """The OpenAI-compatible simulator on loopback; its `stats.requests` counts provider calls."""
    async with Simulator() as sim:
        yield sim


def simulated_settings(
    valkey: EmbeddedValkey, sim: Simulator, auth: AuthSettings, provider_key: str
) -> Settings:
    """Test settings whose only provider is `openai`, answered by the simulator."""
    return make_settings(
        valkey.url,
        auth=auth,
        provider=ProviderSettings(default="openai", fake_enabled=False),
        openai=OpenAISettings(api_key=provider_key, base_url=sim.base_url, model="gpt-sim"),
    )


@pytest.fixture
def settings(valkey: EmbeddedValkey, auth_settings: AuthSettings) -> Settings:
    return make_settings(valkey.url, auth=auth_settings)


def bearer(key: str) -> dict[str, str]:
    return {"Authorization": f"Bearer {key}"}


class Caller:
    """One API key's view of the API."""

    def __init__(self, client: httpx.AsyncClient, key: str, record: ApiKey) -> None:
        self.client = client
        self.key = key
        self.record = record
        self.headers = bearer(key)

    async def post(
        self, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post(path, json=body, headers={**self.headers, **(headers or {})})

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path, headers=self.headers)

    async def delete(self, path: str) -> httpx.Response:
        return await self.client.delete(path, headers=self.headers)

    async def submit(self, prompt: str, **options: Any) -> str:
        answer = await self.post("/api/ai/generate", {"prompt": prompt, "options": options})
        assert answer.status_code == 202, answer.text
        job_id: str = answer.json()["jobId"]
        return job_id

    async def wait(self, job_id: str, timeout_s: float = 20) -> dict[str, Any]:
        """Poll status until the job finishes; returns the last status body."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            body: dict[str, Any] = (await self.get(f"/api/ai/status/{job_id}")).json()
            if body["status"] in ("completed", "failed", "cancelled", "expired"):
                return body
            assert asyncio.get_running_loop().time() < deadline, f"job {job_id} stuck: {body}"
            await asyncio.sleep(0.05)


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


def flow_api_process(*args: str, env: dict[str, str]) -> subprocess.Popen[bytes]:
    """`flow-api ARGS` as a child process; stdout and stderr together."""
    return subprocess.Popen(
        [sys.executable, "-m", "flow_api.cli", *args],
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
    )


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 20) -> tuple[int, str]:
    """SIGINT (if still running), then its exit code and output."""
    if process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"process did not stop in {timeout_s} s:\n{output.decode()}") from None
    return process.returncode, output.decode()
