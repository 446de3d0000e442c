"""Per-key limits over real HTTP and a real Valkey: submits per window (429 `rate_limited`) and
tokens per day (429 `quota_exhausted`, refused before any provider call), and their recovery."""

from __future__ import annotations

import asyncio
import time

import httpx
import pytest

from flow_api.auth.api_keys import ApiKeyStore
from flow_api.embedded import EmbeddedValkey
from flow_api.keys import token_quota_key
from flow_api.settings import AuthSettings, BudgetLimit, Settings
from flow_api.testing.simulator import Simulator
from flow_api.worker import FlowWorker
from tests.security.conftest import Caller, KeyMaker, simulated_settings
from tests.support import WorkerFactory

RATE = AuthSettings(enabled=True, requests_per_minute=3, rate_window_s=3)
QUOTA = AuthSettings(enabled=True, tokens_per_day=100, quota_window_s=3600)
SHORT_QUOTA = AuthSettings(enabled=True, tokens_per_day=100, quota_window_s=2)


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator, auth_settings: AuthSettings) -> Settings:
    return simulated_settings(valkey, simulator, auth_settings, "sk-test-limits")


def assert_429(answer: httpx.Response, code: str, max_wait_s: int) -> int:
    assert answer.status_code == 429, answer.text
    assert answer.json()["error"]["code"] == code
    retry_after = int(answer.headers["retry-after"])
    assert 1 <= retry_after <= max_wait_s
    return retry_after


async def ledger(store: ApiKeyStore, settings: Settings, caller: Caller) -> int:
    window = int(time.time() // settings.auth.quota_window_s)
    key = token_quota_key(settings.redis.queue_name, caller.record.id, window)
    return int(await store.redis.get(key) or 0)


async def jobs_in_queue(store: ApiKeyStore, settings: Settings) -> int:
    """Every job of the queue in any BullMQ state (each is in exactly one of these)."""
    prefix = f"{settings.redis.prefix}:{settings.redis.queue_name}"
    redis = store.redis
    lists = [await redis.llen(f"{prefix}:{name}") for name in ("wait", "active", "paused")]
    sets = [
        await redis.zcard(f"{prefix}:{name}")
        for name in ("delayed", "prioritized", "completed", "failed", "waiting-children")
    ]
    return sum(lists) + sum(sets)


@pytest.mark.parametrize("auth_settings", [RATE], indirect=True)
async def test_submit_rate_is_limited_per_key_and_recovers_after_the_window(
    caller: KeyMaker,
) -> None:
    busy, calm = await caller("acme"), await caller("acme")
    for i in range(3):
        await busy.submit(f"burst {i}")
    refused = await busy.post("/api/ai/generate", {"prompt": "one too many"})
    wait = assert_429(refused, "rate_limited", 3)
    assert "3 requests per 3 s" in refused.json()["error"]["message"]
    await calm.submit("another key has its own budget")
    job_id = await calm.submit("reads are not counted")
    for _ in range(5):
        assert (await busy.get(f"/api/ai/status/{job_id}")).status_code == 200
    await asyncio.sleep(wait + 0.05)  # Retry-After is enough: the oldest submit has left
    await busy.submit("the window has moved on")


@pytest.mark.parametrize("auth_settings", [RATE], indirect=True)
async def test_a_key_can_carry_its_own_rate(caller: KeyMaker) -> None:
    slow, unlimited = (
        await caller("acme", requests_per_minute=1),
        await caller("acme", requests_per_minute=0),
    )
    await slow.submit("first")
    assert_429(await slow.post("/api/ai/generate", {"prompt": "second"}), "rate_limited", 3)
    for i in range(6):
        await unlimited.submit(f"no limit {i}")


@pytest.mark.parametrize("auth_settings", [QUOTA], indirect=True)
async def test_quota_refusal_makes_no_provider_call_and_usage_is_settled(
    caller: KeyMaker,
    worker: FlowWorker,
    simulator: Simulator,
    store: ApiKeyStore,
    settings: Settings,
) -> None:
    acme = await caller("acme")
    # Reserved: "one two" is 7 bytes (a token per byte at most), + 16 for the messages' framing,
    # + maxTokens 40 = 63.
    job_id = await acme.submit("one two", maxTokens=40)
    assert (await acme.wait(job_id))["status"] == "completed"
    used = (await acme.get(f"/api/ai/result/{job_id}")).json()["result"]["usage"]["totalTokens"]
    assert 0 < used < 63
    assert await ledger(store, settings, acme) == used  # the reservation became real usage
    calls = simulator.stats.requests
    assert calls == 1

    # used + 7 + 16 + 75 > 100: refused at submit, so nothing is queued and nothing is called.
    refused = await acme.post(
        "/api/ai/generate", {"prompt": "one two", "options": {"maxTokens": 75}}
    )
    assert_429(refused, "quota_exhausted", 3600)
    assert "quota is spent" in refused.json()["error"]["message"]
    too_big = await acme.post("/api/ai/generate", {"prompt": "x", "options": {"maxTokens": 500}})
    assert_429(too_big, "quota_exhausted", 3600)
    assert "more than the key's whole quota" in too_big.json()["error"]["message"]
    assert await ledger(store, settings, acme) == used  # the refusals reserved nothing

    # What is left still fits a smaller request, and other keys have their own quota.
    job_id = await acme.submit("one two", maxTokens=50)
    assert (await acme.wait(job_id))["status"] == "completed"
    # Nothing was queued for the refused submits: the queue holds the two accepted jobs only,
    # and the provider saw one more call (this one), not a wrongly queued job's.
    assert await jobs_in_queue(store, settings) == 2
    assert simulator.stats.requests == calls + 1
    globex = await caller("globex")
    await globex.submit("one two", maxTokens=70)


@pytest.mark.parametrize("auth_settings", [QUOTA], indirect=True)
async def test_a_failed_job_is_refunded(
    caller: KeyMaker, start_worker: WorkerFactory, store: ApiKeyStore, settings: Settings
) -> None:
    acme = await caller("acme")
    job_id = await acme.submit("[[sim:refund-test:400]] rejected", maxTokens=40)
    assert await ledger(store, settings, acme) > 80  # reserved at submit (32 + 16 + 40)
    await start_worker()
    assert (await acme.wait(job_id))["status"] == "failed"
    assert await ledger(store, settings, acme) == 0
    await acme.submit("the whole quota is back", maxTokens=60)


@pytest.mark.parametrize("auth_settings", [SHORT_QUOTA], indirect=True)
async def test_quota_recovers_in_the_next_window(caller: KeyMaker) -> None:
    window_s = SHORT_QUOTA.quota_window_s
    for _ in range(5):  # a fresh key each time: both submits must fall in one window
        acme = await caller("acme")
        await asyncio.sleep(window_s - time.time() % window_s + 0.05)  # a window's start
        window = time.time() // window_s
        await acme.submit("x", maxTokens=70)
        refused = await acme.post("/api/ai/generate", {"prompt": "x", "options": {"maxTokens": 70}})
        if time.time() // window_s == window:
            break  # (on a stalled machine the window can end between the two: try again)
    else:
        pytest.fail("never two submits within one quota window")
    wait = assert_429(refused, "quota_exhausted", window_s)
    await asyncio.sleep(wait + 0.05)
    await acme.submit("x", maxTokens=70)


@pytest.mark.parametrize("auth_settings", [QUOTA], indirect=True)
async def test_cancelling_a_job_waiting_for_budget_refunds_its_tokens(
    caller: KeyMaker,
    start_worker: WorkerFactory,
    store: ApiKeyStore,
    settings: Settings,
    simulator: Simulator,
) -> None:
    # One call a minute for the model: the second job is put back in BullMQ's delayed set to
    # wait for the budget (no attempt spent), and cancelled there.
    paced = settings.model_copy(deep=True)  # the running API keeps its own settings
    paced.budget.limits = {"openai/*": BudgetLimit(rpm=1)}
    await start_worker(paced)
    acme = await caller("acme")
    first = await acme.submit("one two", maxTokens=20)
    assert (await acme.wait(first))["status"] == "completed"
    used = await ledger(store, settings, acme)
    waiting = await acme.submit("one two", maxTokens=20)
    assert await ledger(store, settings, acme) > used  # reserved at submit
    delayed = f"{settings.redis.prefix}:{settings.redis.queue_name}:delayed"
    deadline = time.monotonic() + 20
    while await store.redis.zscore(delayed, waiting) is None:
        assert time.monotonic() < deadline, "the job was never put back to wait for budget"
        await asyncio.sleep(0.05)
    answer = await acme.post(f"/api/ai/jobs/{waiting}/cancel")
    assert answer.status_code == 200, answer.text
    status = await acme.wait(waiting)
    assert status["status"] == "cancelled", status
    # The worker that takes the promoted job ends it without a call and gives back its tokens.
    deadline = time.monotonic() + 20
    while await ledger(store, settings, acme) != used:
        assert time.monotonic() < deadline, "the cancelled job's tokens were never given back"
        await asyncio.sleep(0.05)
    assert simulator.stats.requests == 1  # no call for the cancelled job


@pytest.mark.parametrize("auth_settings", [QUOTA], indirect=True)
async def test_an_expired_job_is_refunded(
    caller: KeyMaker,
    start_worker: WorkerFactory,
    store: ApiKeyStore,
    settings: Settings,
    simulator: Simulator,
) -> None:
    acme = await caller("acme")
    job_id = await acme.submit("one two", maxTokens=70, startWithinMs=100)
    assert await ledger(store, settings, acme) > 70  # reserved at submit
    await asyncio.sleep(0.2)  # no worker yet: the start deadline passes
    await start_worker(settings)
    # The API answers `expired` as soon as the deadline has passed; the worker that takes the
    # job then ends it (no call) and gives its reservation back.
    assert (await acme.wait(job_id))["status"] == "expired"
    deadline = time.monotonic() + 20
    while await ledger(store, settings, acme) != 0:
        assert time.monotonic() < deadline, "the expired job's tokens were never given back"
        await asyncio.sleep(0.05)
    assert simulator.stats.requests == 0


@pytest.mark.parametrize("auth_settings", [QUOTA], indirect=True)
async def test_a_job_failed_for_crashing_its_workers_is_refunded(
    caller: KeyMaker, start_worker: WorkerFactory, store: ApiKeyStore, settings: Settings
) -> None:
    # What BullMQ's stalled check writes on a job whose workers died more than maxStalledCount
    # times (`defa`, a deferred failure), set here on a waiting job so that the next take is
    # the one that fails it (`tests/reliability/test_crash_and_shutdown.py` kills real workers
    # for it). Moved to failed behind the handler's back, its reservation stayed spent (soak
    # seed 15667905: a key's ledger 107 tokens above its completed jobs' usage).
    acme = await caller("acme")
    job_id = await acme.submit("crashes every worker", maxTokens=40)
    assert await ledger(store, settings, acme) > 40
    job_key = f"{settings.redis.prefix}:{settings.redis.queue_name}:{job_id}"
    await store.redis.hset(job_key, "defa", "job stalled more than allowable limit")
    await start_worker()
    status = await acme.wait(job_id)
    assert status["status"] == "failed", status
    assert status["error"]["code"] == "worker_lost", status
    assert "FLOW_WORKER_MAX_STALLED" in status["error"]["message"]
    assert await ledger(store, settings, acme) == 0
    record = (await acme.get(f"/api/ai/jobs/{job_id}")).json()
    assert "worker_lost" in str(record), record
