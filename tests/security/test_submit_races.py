"""Submits at once (issue 12, defects 2 and 6): concurrent requests with one `Idempotency-Key`
answer the first request's outcome, and a key's token quota holds under concurrency. Real
Valkey, real HTTP, the simulator behind the OpenAI SDK."""

from __future__ import annotations

import asyncio
import time

import orjson
import pytest

from flow_api.auth.api_keys import ApiKeyStore
from flow_api.embedded import EmbeddedValkey
from flow_api.idempotency import IdempotencyStore
from flow_api.jobs import MESSAGE_OVERHEAD_TOKENS
from flow_api.keys import token_quota_key
from flow_api.settings import AuthSettings, Settings
from flow_api.testing.simulator import Simulator
from flow_api.worker import FlowWorker
from tests.security.conftest import Caller, KeyMaker, simulated_settings

SMALL = AuthSettings(enabled=True, tokens_per_day=100, quota_window_s=3600)
QUOTA = AuthSettings(
    enabled=True, tokens_per_day=80, quota_window_s=3600, estimate_completion_tokens=3
)
EXACT = AuthSettings(enabled=True, tokens_per_day=1000, quota_window_s=3600)


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator, auth_settings: AuthSettings) -> Settings:
    return simulated_settings(valkey, simulator, auth_settings, "sk-test-races")


async def ledger(store: ApiKeyStore, settings: Settings, caller: Caller) -> int:
    window = int(time.time() // settings.auth.quota_window_s)
    key = token_quota_key(settings.redis.queue_name, caller.record.id, window)
    return int(await store.redis.get(key) or 0)


async def burst(caller: Caller, body: dict[str, object], key: str | None, n: int) -> list[object]:
    headers = {"Idempotency-Key": key} if key else None
    return list(
        await asyncio.gather(
            *(caller.post("/api/ai/generate", body, headers=headers) for _ in range(n))
        )
    )


@pytest.mark.parametrize("auth_settings", [SMALL], indirect=True)
async def test_replays_of_a_refused_claimant_get_its_error(caller: KeyMaker) -> None:
    """Before the fix: 2 x 429 and 8 x 202 `Idempotent-Replayed` whose job ids were all 404."""
    acme = await caller("acme")
    body = {"prompt": "too big", "options": {"maxTokens": 500}}
    answers = await burst(acme, body, "order-1", 10)
    assert [a.status_code for a in answers] == [429] * 10, [a.text for a in answers]
    assert {a.json()["error"]["code"] for a in answers} == {"quota_exhausted"}
    assert len({a.json()["error"]["message"] for a in answers}) == 1


@pytest.mark.parametrize("auth_settings", [EXACT], indirect=True)
async def test_replays_of_an_accepted_claimant_name_its_job(caller: KeyMaker) -> None:
    acme = await caller("acme")
    body = {"prompt": "once", "options": {"maxTokens": 10}}
    answers = await burst(acme, body, "order-2", 20)
    assert [a.status_code for a in answers] == [202] * 20, [a.text for a in answers]
    ids = {a.json()["jobId"] for a in answers}
    assert len(ids) == 1
    assert sum(1 for a in answers if a.headers.get("idempotent-replayed") == "true") == 19
    assert (await acme.get(f"/api/ai/status/{ids.pop()}")).status_code == 200


@pytest.mark.parametrize("auth_settings", [EXACT], indirect=True)
async def test_a_crashed_claimant_blocks_its_key_only_briefly(
    caller: KeyMaker, store: ApiKeyStore, settings: Settings
) -> None:
    acme = await caller("acme")
    body = {"prompt": "after a crash", "options": {"maxTokens": 10}}
    idem = IdempotencyStore(store.redis, settings.redis.queue_name, 60)
    fingerprint = orjson.dumps(
        {"prompt": "after a crash", "options": {"maxTokens": 10}}, option=orjson.OPT_SORT_KEYS
    )
    # A claimant that died after claiming: its pending claim names a job that never came.
    claim, earlier = await idem.claim("acme", "order-3", fingerprint, "0" * 32)
    assert earlier is None
    await store.redis.expire(claim.name, 7)  # (30 s in production; shortened here)
    started = time.monotonic()
    waiting = await acme.post("/api/ai/generate", body, headers={"Idempotency-Key": "order-3"})
    assert waiting.status_code == 409, waiting.text
    assert waiting.json()["error"]["code"] == "idempotency_key_in_progress"
    assert waiting.headers["retry-after"] == "1"
    assert 4 < time.monotonic() - started < 7  # waited for the claimant, bounded
    await asyncio.sleep(max(0.0, 7.2 - (time.monotonic() - started)))
    fresh = await acme.post("/api/ai/generate", body, headers={"Idempotency-Key": "order-3"})
    assert fresh.status_code == 202, fresh.text
    assert "idempotent-replayed" not in fresh.headers
    assert (await acme.get(f"/api/ai/status/{fresh.json()['jobId']}")).status_code == 200


@pytest.mark.parametrize("auth_settings", [EXACT], indirect=True)
async def test_concurrent_reservations_are_atomic(
    caller: KeyMaker, store: ApiKeyStore, settings: Settings
) -> None:
    acme = await caller("acme")
    # 4 bytes + the framing allowance + the rest of 100 tokens each: exactly 10 fit in 1000.
    body = {"prompt": "abcd", "options": {"maxTokens": 100 - 4 - MESSAGE_OVERHEAD_TOKENS}}
    answers = await burst(acme, body, None, 25)
    codes = sorted(a.status_code for a in answers)
    assert codes == [202] * 10 + [429] * 15, codes
    assert await ledger(store, settings, acme) == 1000


@pytest.mark.parametrize("auth_settings", [QUOTA], indirect=True)
async def test_the_ledger_never_passes_the_quota(
    caller: KeyMaker, store: ApiKeyStore, settings: Settings, worker: FlowWorker
) -> None:
    """Requests without `maxTokens` whose answers are longer than the completion the quota
    reserved. Before the fix (4 characters a token, no cap on the call) five were admitted
    and their usage pushed the ledger past the quota (105 of 80)."""
    acme = await caller("acme")
    prompt = "one two three four five six seven eight nine ten"
    answers = await burst(acme, {"prompt": prompt}, None, 6)
    ids = [a.json()["jobId"] for a in answers if a.status_code == 202]
    assert ids, [a.text for a in answers]
    peak = 0
    for job_id in ids:
        while (await acme.status(job_id))["status"] not in ("completed", "failed"):
            peak = max(peak, await ledger(store, settings, acme))
            await asyncio.sleep(0.01)
    used = 0
    for job_id in ids:
        result = (await acme.get(f"/api/ai/result/{job_id}")).json()["result"]
        assert result["usage"]["completionTokens"] <= 3  # held to the reserved completion
        used += result["usage"]["totalTokens"]
    final = await ledger(store, settings, acme)
    assert max(peak, final) <= 80, (peak, final)
    assert final == used
