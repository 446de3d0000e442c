"""Usage and cost: a job's cost in its record, per-tenant totals by model and by key, and a
key's spend cap holding under concurrent submits."""

from __future__ import annotations

import asyncio
from collections.abc import AsyncIterator
from datetime import timedelta

import pytest

from flow_api.auth.api_keys import ApiKeyStore
from flow_api.auth.principal import Scope
from flow_api.embedded import EmbeddedValkey
from flow_api.models import Usage
from flow_api.observability.usage import PriceTable, today
from flow_api.queue.connection import connect
from flow_api.settings import AuthSettings, Price, Settings, UsageSettings
from flow_api.testing import Simulator
from tests.support import Api, JobClient, WorkerFactory, cloud_settings

PRICES = {"openai/gpt-sim": Price(input=1000, output=2000)}
"""Per million tokens: a simulated call (3 prompt, 4 completion tokens) costs 0.011."""
JOB_COST = 0.011


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator) -> Settings:
    return cloud_settings(
        valkey.url,
        simulator.url,
        auth=AuthSettings(enabled=True),
        usage=UsageSettings(prices=PRICES),
    )


@pytest.fixture
async def store(settings: Settings) -> AsyncIterator[ApiKeyStore]:
    redis = connect(settings.redis)
    yield ApiKeyStore(redis, settings.redis.queue_name)
    await redis.aclose()


async def key_of(
    store: ApiKeyStore, api: Api, tenant: str, spend: float | None = None
) -> tuple[JobClient, str]:
    record, key = await store.create(
        tenant, "usage", frozenset({Scope.SUBMIT, Scope.READ}), spend_per_day=spend
    )
    return JobClient(api.client, {"Authorization": f"Bearer {key}"}), record.id


async def test_cost_per_job_and_usage_by_model_and_key_per_tenant(
    api: Api, store: ApiKeyStore, start_worker: WorkerFactory
) -> None:
    await start_worker()
    (a1, a1_id), (a2, a2_id) = await key_of(store, api, "acme"), await key_of(store, api, "acme")
    b1, _ = await key_of(store, api, "beta")
    ids = [
        *[await a1.submit(f"question number {i}") for i in range(3)],
        *[await a2.submit(f"question number {i}") for i in range(2)],
    ]
    other = await b1.submit("question number 9")
    for job_id in ids:
        assert (await a1.wait(job_id))["status"] == "completed"
    assert (await b1.wait(other))["status"] == "completed"
    record = await a1.record(ids[0])
    assert record["result"]["cost"] == {"amount": JOB_COST, "currency": "USD"}

    by_model = (await a1.get("/api/ai/usage")).json()
    assert by_model["tenant"] == "acme"
    assert by_model["groupBy"] == "model"
    assert by_model["to"] == today().isoformat()
    assert by_model["from"] == (today() - timedelta(days=29)).isoformat()
    [group] = by_model["groups"]
    assert group["name"] == "openai/gpt-sim"
    assert group["jobs"] == 5
    assert (group["promptTokens"], group["completionTokens"]) == (15, 20)
    assert group["cost"] == pytest.approx(5 * JOB_COST)
    assert by_model["total"]["cost"] == pytest.approx(5 * JOB_COST)

    by_key = (await a2.get(f"/api/ai/usage?groupBy=key&from={today()}&to={today()}")).json()
    assert {g["name"]: g["jobs"] for g in by_key["groups"]} == {a1_id: 3, a2_id: 2}

    theirs = (await b1.get("/api/ai/usage")).json()
    assert theirs["tenant"] == "beta"
    assert theirs["total"]["jobs"] == 1


@pytest.mark.parametrize(
    "query",
    ["from=2026-02-02&to=2026-02-01", "from=2024-01-01&to=2026-01-01", "groupBy=tenant", "to=x"],
)
async def test_usage_refuses_bad_ranges_with_a_json_422(
    api: Api, store: ApiKeyStore, query: str
) -> None:
    caller, _ = await key_of(store, api, "acme")
    answer = await caller.get(f"/api/ai/usage?{query}")
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["code"]


async def test_usage_needs_a_key(api: Api) -> None:
    answer = await api.client.get("/api/ai/usage")
    assert answer.status_code == 401
    assert answer.json()["error"]["code"] == "unauthorized"


async def test_a_spend_cap_holds_under_concurrent_submits_and_settles_to_the_real_cost(
    api: Api, store: ApiKeyStore, start_worker: WorkerFactory
) -> None:
    # "question number N" reserves its bound: (17 bytes + 16) x 1000 + 10 x 2000 = 53 000
    # millionths; a cap of 0.1855 fits 3 reservations, not 4.
    caller, _ = await key_of(store, api, "acme", spend=0.1855)
    body = {"prompt": "question number 1", "options": {"maxTokens": 10}}
    answers = await asyncio.gather(*(caller.post("/api/ai/generate", body) for _ in range(10)))
    statuses = sorted(a.status_code for a in answers)
    assert statuses == [202] * 3 + [429] * 7
    refused = next(a for a in answers if a.status_code == 429)
    assert refused.json()["error"]["code"] == "spend_cap_reached"
    assert int(refused.headers["Retry-After"]) >= 1

    worker = await start_worker()
    for answer in answers:
        if answer.status_code == 202:
            assert (await caller.wait(answer.json()["jobId"]))["status"] == "completed"
    await worker.stop()  # the next jobs stay reserved, not settled
    # Settled at 0.011 each: 0.1855 - 0.033 leaves room for 2 more reservations, not 3.
    more = [(await caller.post("/api/ai/generate", body)).status_code for _ in range(3)]
    assert more == [202, 202, 429]


async def test_a_key_without_a_cap_is_never_refused_for_spend(api: Api, store: ApiKeyStore) -> None:
    caller, _ = await key_of(store, api, "acme")
    answers = await asyncio.gather(
        *(caller.post("/api/ai/generate", {"prompt": "free"}) for _ in range(5))
    )
    assert {a.status_code for a in answers} == {202}


def test_prices_fall_back_to_the_provider_wildcard_and_unknown_models_cost_nothing() -> None:
    table = PriceTable(UsageSettings(prices={"openai/*": Price(input=1, output=3)}))
    usage = Usage(prompt_tokens=1_000_000, completion_tokens=2_000_000, total_tokens=3_000_000)
    assert table.cost("openai", "some-new-model", usage).amount == 7.0
    assert table.cost("openai", "gpt-4o-mini", usage).amount == 1.35  # the built-in price
    assert table.cost("local", "gemma", usage).amount == 0
    assert table.cost("nobody", "knows", usage).amount == 0


async def test_usage_is_kept_by_day(api: Api, store: ApiKeyStore, settings: Settings) -> None:
    from flow_api.observability.usage import UsageLedger

    redis = connect(settings.redis)
    try:
        ledger = UsageLedger(redis, settings.redis.queue_name, 1)
        day = today() - timedelta(days=3)
        usage = Usage(prompt_tokens=10, completion_tokens=5, total_tokens=15)
        await ledger.record("acme", "k1", "openai/gpt-sim", usage, None, day=day)
        caller, _ = await key_of(store, api, "acme")
        inside = (await caller.get(f"/api/ai/usage?from={day}&to={day}")).json()
        outside = (await caller.get(f"/api/ai/usage?from={today()}")).json()
    finally:
        await redis.aclose()
    assert inside["total"]["jobs"] == 1
    assert inside["total"]["totalTokens"] == 15
    assert outside["total"]["jobs"] == 0
