"""Batches and files belong to a tenant: another tenant's key gets the 404 an unknown id gets,
on every endpoint; a key's token quota covers each line of its batches."""

from __future__ import annotations

import io

import openai
import pytest

from flow_api.auth.api_keys import ApiKeyStore
from flow_api.auth.principal import Scope
from flow_api.embedded import EmbeddedValkey
from flow_api.queue.connection import connect
from flow_api.settings import AuthSettings, BatchSettings, Settings
from tests.batch.test_batches import jsonl, line, read_lines, wait_for
from tests.support import WorkerFactory, make_settings, serving


@pytest.fixture
def settings(valkey: EmbeddedValkey) -> Settings:
    return make_settings(
        valkey.url, auth=AuthSettings(enabled=True), batch=BatchSettings(sweep_s=0.2)
    )


async def _key(settings: Settings, tenant: str, **limits: int) -> str:
    redis = connect(settings.redis)
    try:
        scopes = frozenset({Scope.SUBMIT, Scope.READ})
        _, key = await ApiKeyStore(redis, settings.redis.queue_name).create(
            tenant, "test", scopes, **limits
        )
    finally:
        await redis.aclose()
    return key


def _sdk(settings: Settings, key: str) -> openai.AsyncOpenAI:
    base = f"http://127.0.0.1:{settings.api.port}/v1"
    return openai.AsyncOpenAI(base_url=base, api_key=key, max_retries=0)


async def test_another_tenants_batch_and_files_are_not_found(
    settings: Settings, start_worker: WorkerFactory
) -> None:
    await start_worker()
    async with serving(settings) as api:
        acme = _sdk(settings, await _key(settings, "acme"))
        other = _sdk(settings, await _key(settings, "other"))
        content = jsonl([line(f"r{i}", f"q{i}", model="fake/m") for i in range(3)])
        uploaded = await acme.files.create(file=("in.jsonl", io.BytesIO(content)), purpose="batch")
        batch = await acme.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await wait_for(acme, batch.id, "completed")
        assert done.output_file_id is not None
        for file_id in (uploaded.id, done.output_file_id):
            with pytest.raises(openai.NotFoundError):
                await other.files.retrieve(file_id)
            with pytest.raises(openai.NotFoundError):
                await other.files.content(file_id)
            with pytest.raises(openai.NotFoundError):
                await other.files.delete(file_id)
        with pytest.raises(openai.NotFoundError):
            await other.batches.retrieve(batch.id)
        with pytest.raises(openai.NotFoundError):
            await other.batches.cancel(batch.id)
        with pytest.raises(openai.NotFoundError):  # its file cannot start a batch either
            await other.batches.create(
                input_file_id=uploaded.id,
                endpoint="/v1/chat/completions",
                completion_window="24h",
            )
        assert (await other.batches.list()).data == []
        assert [b.id for b in (await acme.batches.list()).data] == [batch.id]
        assert len(await read_lines(acme, done.output_file_id)) == 3
        # Without a key: 401 before anything else.
        answer = await api.client.get(f"/v1/batches/{batch.id}")
        assert answer.status_code == 401
        for client in (acme, other):
            await client.close()


async def test_the_keys_token_quota_covers_each_line(
    settings: Settings, start_worker: WorkerFactory
) -> None:
    await start_worker()
    async with serving(settings) as _:
        # Each line reserves its prompt bytes + 16 + maxTokens 100: about 120 tokens; 500 cover 4.
        client = _sdk(settings, await _key(settings, "acme", tokens_per_day=500))
        content = jsonl([line(f"r{i}", "hi", model="fake/m", max_tokens=100) for i in range(6)])
        uploaded = await client.files.create(
            file=("in.jsonl", io.BytesIO(content)), purpose="batch"
        )
        batch = await client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        done = await wait_for(client, batch.id, "completed")
        assert done.request_counts is not None
        assert (done.request_counts.completed, done.request_counts.failed) == (4, 2)
        assert done.error_file_id is not None
        errors = await read_lines(client, done.error_file_id)
        assert [e["custom_id"] for e in errors] == ["r4", "r5"]
        assert {e["response"]["status_code"] for e in errors} == {429}
        assert {e["response"]["body"]["error"]["code"] for e in errors} == {"quota_exhausted"}
        await client.close()
