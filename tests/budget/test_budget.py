"""Rate budgets shared through Redis: real Valkey, the simulator, real worker processes.

The properties: every worker together stays within a model's limit; waiting for budget or a
429 spends no attempt; a job waiting for budget holds no slot; the tokens reserved from an
estimate are corrected with the real usage; a 429's cooldown holds every worker.
"""

from __future__ import annotations

import time
from datetime import datetime

from flow_api.budget import MINUTE_MS, RateBudget
from flow_api.embedded import EmbeddedValkey
from flow_api.errors import ProviderRateLimited
from flow_api.keys import budget_key
from flow_api.models import GenerateOptions, GenerateRequest, Generation, Usage
from flow_api.queue.connection import connect
from flow_api.settings import BudgetLimit, Settings, WorkerSettings
from flow_api.testing import Simulator
from tests.budget.conftest import MODEL, MakeJobs, budget_settings
from tests.support import WorkerFactory, serving
from tests.support.processes import astop, env_for, flow_api


def seconds(stamp: str) -> float:
    return datetime.fromisoformat(stamp.replace("Z", "+00:00")).timestamp()


async def test_two_worker_processes_share_one_budget(
    valkey: EmbeddedValkey, simulator: Simulator
) -> None:
    rpm, jobs = 240, 24  # one call every 0.25 s between both workers, about 6 s in all
    simulator.config.rpm = rpm
    settings = budget_settings(valkey, simulator, {f"openai/{MODEL}": BudgetLimit(rpm=rpm)})
    async with serving(settings) as api:
        ids = [await api.submit(f"shared budget {i}") for i in range(jobs)]
        workers = [flow_api("worker", env=env_for(settings)) for _ in range(2)]
        try:
            for job_id in ids:
                assert (await api.wait(job_id, timeout_s=60))["status"] == "completed"
        finally:
            outputs = [await astop(w) for w in workers]
        records = [await api.record(i) for i in ids]
    assert all(code == 0 for code, _ in outputs), outputs
    assert simulator.stats.throttled == 0  # the provider never had to refuse a call
    starts = sorted(seconds(a["startedAt"]) for r in records for a in r["attempts"])
    assert len(starts) == jobs
    assert len({a["worker"] for r in records for a in r["attempts"]}) == 2, "both workers ran"
    interval = 60 / rpm
    # Any 9 consecutive calls span 8 intervals, less the jitter of a loaded machine between a
    # reserved start and its logged one: neither worker ran ahead of the shared pace (two
    # workers on their own would have run all 24 at once).
    tightest = min(starts[i + 8] - starts[i] for i in range(jobs - 8))
    assert tightest >= 8 * interval - 0.5, f"9 calls within {tightest:.2f} s"
    assert starts[-1] - starts[0] >= (jobs - 1) * interval - 0.3
    print(
        f"\n2 workers, limit {rpm} rpm: {jobs} calls over {starts[-1] - starts[0]:.2f} s "
        f"(≥ {(jobs - 1) * interval:.2f} s at the limit), 0 throttled"
    )


async def test_a_429_puts_the_job_back_without_spending_an_attempt(
    valkey: EmbeddedValkey, simulator: Simulator, start_worker: WorkerFactory
) -> None:
    settings = budget_settings(valkey, simulator, {})
    settings.worker = WorkerSettings(**{**settings.worker.model_dump(), "attempts": 1})
    async with serving(settings) as api:
        await start_worker(settings)
        job_id = await api.submit("[[sim:z:429@0.3,429@0.3,ok]] only one attempt")
        status = await api.wait(job_id, timeout_s=20)
        body = await api.record(job_id)
    assert status["status"] == "completed", status  # one attempt allowed, two 429s survived
    assert status["attempts"] == 1, status  # a job is read in one snapshot (issue 21)
    codes = [a.get("error", {}).get("code") for a in body["attempts"]]
    assert codes == ["provider_rate_limited", "provider_rate_limited", None]
    assert [a["attempt"] for a in body["attempts"]] == [1, 1, 1]
    gap = seconds(body["attempts"][1]["startedAt"]) - seconds(body["attempts"][0]["finishedAt"])
    assert gap >= 0.29, f"the cooldown (Retry-After 0.3 s) was not honoured: {gap:.3f} s"
    assert simulator.stats.by_key["z"] == 3


async def test_waiting_for_budget_spends_no_attempt(
    valkey: EmbeddedValkey, start_worker: WorkerFactory
) -> None:
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(rpm=120)})
    settings.worker = WorkerSettings(**{**settings.worker.model_dump(), "attempts": 1})
    async with serving(settings) as api:
        await start_worker(settings)
        started = time.monotonic()
        ids = [await api.submit(f"paced {i}") for i in range(5)]
        statuses = [await api.wait(i, timeout_s=20) for i in ids]
        took = time.monotonic() - started
        bodies = [await api.record(i) for i in ids]
    assert [s["status"] for s in statuses] == ["completed"] * 5
    assert [s["attempts"] for s in statuses] == [1] * 5  # one snapshot read (issue 21)
    assert [len(b["attempts"]) for b in bodies] == [1] * 5  # waiting is not an attempt
    assert took >= 4 * 0.5 - 0.1, f"5 calls at 120 rpm took only {took:.2f} s"


async def test_a_job_waiting_for_budget_holds_no_slot(
    valkey: EmbeddedValkey, start_worker: WorkerFactory
) -> None:
    # One slot. The "slow" model allows one call per 10 s; a job for another model submitted
    # behind two "slow" ones must run at once, while the second "slow" job waits queued.
    settings = budget_settings(valkey, None, {"fake/slow": BudgetLimit(rpm=6)})
    settings.worker = WorkerSettings(**{**settings.worker.model_dump(), "concurrency": 1})
    async with serving(settings) as api:
        await start_worker(settings)
        first = await api.submit("slow one", model="slow")
        assert (await api.wait(first, timeout_s=10))["status"] == "completed"
        second = await api.submit("slow two", model="slow")
        started = time.monotonic()
        other = await api.submit("another model", model="quick")
        assert (await api.wait(other, timeout_s=5))["status"] == "completed"
        took = time.monotonic() - started
        waiting = (await api.client.get(f"/api/ai/status/{second}")).json()
    assert waiting["status"] == "waiting", waiting
    assert waiting["attempts"] == 0
    assert took < 5, f"the other model's job waited {took:.2f} s behind a throttled one"


async def token_time(settings: Settings, model: str) -> float:
    client = connect(settings.redis)
    try:
        value = await client.hget(budget_key(settings.redis.queue_name, "fake", model), "t")
    finally:
        await client.aclose()
    return float(value)


async def test_reconciliation_corrects_the_reserved_tokens(
    valkey: EmbeddedValkey, jobs: MakeJobs
) -> None:
    tpm = 60_000
    settings = budget_settings(
        valkey, None, {"fake/*": BudgetLimit(tpm=tpm)}, completion_tokens=1000
    )
    taken = jobs(settings)
    per_token_ms = MINUTE_MS / (tpm * (1 - settings.budget.headroom))
    request = GenerateRequest(prompt="x" * 400)  # estimate: 400 / 4 + 1000 = 1100 tokens
    capped = GenerateRequest(prompt="x" * 400, options=GenerateOptions(max_tokens=300))
    async with RateBudget(settings) as budget:
        ticket = await budget.admit(await taken.take(), "fake", "m", request)
        assert ticket.tokens == 1100
        reserved = await token_time(settings, "m")
        used = Usage(prompt_tokens=90, completion_tokens=40, total_tokens=130)
        await budget.settle(ticket, Generation(text="", provider="fake", model="m", usage=used))
        corrected = await token_time(settings, "m")
        # Without maxTokens the real completion is charged: 90 + 40 = 130, 970 given back.
        assert abs((reserved - corrected) - 970 * per_token_ms) < 1.0

        ticket = await budget.admit(await taken.take(), "fake", "n", capped)
        assert ticket.tokens == 400
        reserved = await token_time(settings, "n")
        used = Usage(prompt_tokens=150, completion_tokens=20, total_tokens=170)
        await budget.settle(ticket, Generation(text="", provider="fake", model="n", usage=used))
        corrected = await token_time(settings, "n")
        # With maxTokens the provider counts all of it: 150 + 300 = 450, 50 more than reserved.
        assert abs((corrected - reserved) - 50 * per_token_ms) < 1.0


async def test_a_429_cools_the_model_down_for_every_worker(
    valkey: EmbeddedValkey, jobs: MakeJobs
) -> None:
    settings = budget_settings(valkey, None, {"fake/*": BudgetLimit(rpm=6000)})
    taken = jobs(settings)
    request = GenerateRequest(prompt="hello")
    async with RateBudget(settings) as one, RateBudget(settings) as other:
        hit = await taken.take()
        ticket = await one.admit(hit, "fake", "m", request)
        before = int(time.time() * 1000)
        limited = ProviderRateLimited("429", retry_after=2.0)
        hit_until = await taken.deferred(one.rate_limited(hit, ticket, limited), hit)
        assert hit_until is not None and hit_until >= before + 2000
        waiting = await taken.take()
        waiting_until = await taken.deferred(other.admit(waiting, "fake", "m", request), waiting)
        # The other worker's job waits for the cooldown too, instead of calling the provider.
        assert waiting_until is not None
        assert waiting_until >= hit_until


async def test_limits_are_learned_from_the_provider_headers(
    valkey: EmbeddedValkey, simulator: Simulator, start_worker: WorkerFactory, jobs: MakeJobs
) -> None:
    simulator.config.rpm, simulator.config.tpm = 600, 100_000
    settings = budget_settings(valkey, simulator, {})
    async with serving(settings) as api:
        await start_worker(settings)
        assert (await api.wait(await api.submit("learn"), timeout_s=10))["status"] == "completed"
    # Another worker, which never called the model, is charged against the learned limits.
    async with RateBudget(settings) as other:
        job = await jobs(settings).take()
        ticket = await other.admit(job, "openai", MODEL, GenerateRequest(prompt="hi"))
    assert (ticket.limits.requests, ticket.limits.tokens) == (600, 100_000)
    assert other.limits_for("openai", MODEL) == ticket.limits
