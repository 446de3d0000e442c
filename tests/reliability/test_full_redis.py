"""A full Redis never wedges the queue (issue 22).

A dedicated valkey-server with a small `maxmemory` and `noeviction` (the policy the README asks
for): a flood of large prompts is refused with 503 `queue_full` before Redis refuses writes;
`/readyz` and `flow-api check` say so; workers drain every accepted job and admission reopens by
itself. A worker facing a Redis that refuses its writes backs off quietly and recovers by
itself, and a finish refused for memory is retried without calling the provider again.
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import orjson
import pytest
from redis.asyncio import Redis

from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.keys import admission_refusals_key
from flow_api.service import check
from flow_api.settings import Settings
from flow_api.testing import Simulator
from flow_api.worker import FlowWorker
from tests.support import Api, WorkerFactory, cloud_settings, make_settings, serving

ROOM_BYTES = 6 * 1_048_576
"""`maxmemory` is set this far above what the empty server uses."""
PROMPT = "word " * 4000  # 20 KB: a few hundred fill the room
SHORT_ANSWER = {"maxTokens": 5}  # the fake model echoes the prompt: keep its answer short


@pytest.fixture
async def full_valkey(tmp_path: Path) -> AsyncIterator[EmbeddedValkey]:
    server = EmbeddedValkey(tmp_path / "valkey")
    await server.astart()
    async with Redis.from_url(server.url) as redis:
        used = int((await redis.info("memory"))["used_memory"])
        await redis.config_set("maxmemory", used + ROOM_BYTES)
    yield server
    await asyncio.to_thread(server.stop)


@pytest.fixture
async def redis(full_valkey: EmbeddedValkey) -> AsyncIterator[Redis]:
    async with Redis.from_url(full_valkey.url, decode_responses=True) as client:
        yield client


@pytest.fixture
def settings(full_valkey: EmbeddedValkey) -> Settings:
    return make_settings(full_valkey.url)


async def flood(api: Api, submits: int, concurrency: int = 30) -> dict[str, list[httpx.Response]]:
    """`submits` submits of 20 KB prompts from `concurrency` clients; answers by kind."""
    answers: dict[str, list[httpx.Response]] = {"accepted": [], "refused": [], "other": []}
    resets: list[str] = []
    left = submits

    async def client() -> None:
        nonlocal left
        while left > 0:
            left -= 1
            try:
                answer = await api.post(
                    "/api/ai/generate", {"prompt": PROMPT, "options": SHORT_ANSWER}
                )
            except httpx.TransportError as exc:
                resets.append(type(exc).__name__)
                continue
            kind = {202: "accepted", 503: "refused"}.get(answer.status_code, "other")
            answers[kind].append(answer)

    await asyncio.gather(*(client() for _ in range(concurrency)))
    assert resets == [], f"{len(resets)} connections failed: {resets[:5]}"
    return answers


@pytest.mark.timeout(60)
async def test_a_flood_is_refused_with_queue_full_then_drains_and_admission_reopens(
    api: Api, start_worker: WorkerFactory, settings: Settings, redis: Redis
) -> None:
    answers = await flood(api, submits=600)

    accepted, refused = answers["accepted"], answers["refused"]
    assert answers["other"] == [], [(a.status_code, a.text[:200]) for a in answers["other"]]
    assert accepted and refused, (len(accepted), len(refused))
    for answer in refused:
        error = answer.json()["error"]
        assert error["code"] == "queue_full", error
        assert error["reason"] in ("redis_memory", "redis_out_of_memory"), error
        assert int(answer.headers["Retry-After"]) >= 1
    # The flood's 20 KB prompts stop fitting before a small job does, and Redis's used_memory
    # also counted the flood's connection buffers, freed as it ends. Top it up with small jobs
    # until not even one fits: then the probes must say so (readyz from the same reading,
    # `check` from its own).
    problems: list[str] = []
    for _ in range(200):
        answer = await api.post("/api/ai/generate", {"prompt": "small", "options": SHORT_ANSWER})
        if answer.status_code == 202:
            accepted.append(answer)
            continue
        refused.append(answer)
        ready = await api.get("/readyz")
        problems = await check(settings)
        if ready.status_code == 503 and any("queue full" in p for p in problems):
            break
    assert ready.status_code == 503, ready.text
    assert ready.json()["error"]["code"] == "queue_full"
    assert any("queue full" in p for p in problems), problems
    counted = await redis.hget(admission_refusals_key(settings.redis.queue_name), "default")
    # Admission's refusals are counted; one Redis refuses to store while over its limit is not
    # (the "admission reopened" log line counts every one), nor a write Redis itself refused.
    by_admission = [a for a in refused if a.json()["error"]["reason"] == "redis_memory"]
    assert 0 < int(counted or 0) <= len(by_admission)

    await start_worker()
    ids = [answer.json()["jobId"] for answer in accepted]
    for job_id in ids:
        assert (await api.wait(job_id, timeout_s=30))["status"] == "completed"
    stored = orjson.loads(await redis.hget(f"bull:{settings.redis.queue_name}:{ids[0]}", "data"))
    assert len(stored["request"]["prompt"]) == 1024
    assert stored["trimmedChars"] == len(PROMPT)

    # Completed jobs no longer hold their prompts: the room comes back without anyone's help.
    deadline = time.monotonic() + 10
    while (await api.get("/readyz")).status_code != 200:
        assert time.monotonic() < deadline, (await api.get("/readyz")).text
        await asyncio.sleep(0.2)
    assert await api.submit(PROMPT, **SHORT_ANSWER)
    reasons = Counter(a.json()["error"]["reason"] for a in refused)
    print(
        f"\nflood of 600 20 KB prompts into {ROOM_BYTES // 1_048_576} MB: {len(accepted)} accepted "
        f"and completed, {len(refused)} refused with 503 queue_full {dict(reasons)}, 0 resets"
    )


@pytest.mark.timeout(60)
async def test_writes_redis_refuses_for_memory_are_503_queue_full_never_500(
    full_valkey: EmbeddedValkey, redis: Redis
) -> None:
    # Admission control blind (its reading saw no limit): Redis itself refuses,
    # in the enqueue script and in the idempotency claim, and every refusal is still a 503.
    settings = make_settings(full_valkey.url)
    settings.admission.refresh_s = 60
    limit = (await redis.config_get("maxmemory"))["maxmemory"]
    async with serving(settings) as api:
        # The API's one reading for the next minute is taken while Redis has no limit (and no
        # budget is set): admission has nothing to check against, so Redis refuses by itself.
        await redis.config_set("maxmemory", 0)
        assert (await api.get("/readyz")).status_code == 200
        await redis.config_set("maxmemory", limit)
        answers = await flood(api, submits=400)
        keyed = [
            await api.post(
                "/api/ai/generate",
                {"prompt": PROMPT, "options": SHORT_ANSWER},
                headers={"Idempotency-Key": f"key-{n}"},
            )
            for n in range(5)
        ]
    assert answers["other"] == [], [(a.status_code, a.text[:200]) for a in answers["other"]]
    refused = answers["refused"] + [a for a in keyed if a.status_code == 503]
    assert answers["refused"] and len(refused) == len(answers["refused"]) + len(keyed)
    reasons: Counter[str] = Counter()
    for answer in refused:
        error = answer.json()["error"]
        assert error["code"] == "queue_full", error
        reasons[error["reason"]] += 1
        assert int(answer.headers["Retry-After"]) >= 1
    # Admission still closes once Redis is past its limit (it lets used_memory overshoot a
    # little); most refusals are Redis's own.
    assert set(reasons) <= {"redis_out_of_memory", "redis_memory"}, reasons
    assert reasons["redis_out_of_memory"] > 0, reasons
    assert all(a.status_code in (202, 503) for a in keyed), [a.text for a in keyed]


@pytest.mark.timeout(60)
async def test_without_maxmemory_a_byte_budget_closes_admission_from_a_shared_reading(
    full_valkey: EmbeddedValkey, redis: Redis
) -> None:
    await redis.config_set("maxmemory", 0)
    used = int((await redis.info("memory"))["used_memory"])
    settings = make_settings(full_valkey.url)
    settings.admission.memory_budget_bytes = used + 2 * 1_048_576
    async with serving(settings) as api:
        await api.submit("warm-up: bullmq reads the server's version (an INFO) once")
        before = (await redis.info("commandstats"))["cmdstat_info"]["calls"]
        started = time.monotonic()
        answers = await flood(api, submits=300)
        took = time.monotonic() - started
        readings = (await redis.info("commandstats"))["cmdstat_info"]["calls"] - before - 1
    assert answers["other"] == [] and answers["accepted"] and answers["refused"]
    for answer in answers["refused"]:
        error = answer.json()["error"]
        assert (error["code"], error["reason"]) == ("queue_full", "redis_memory"), error
        assert "memory budget" in error["message"]
    # One INFO per refresh period (0.5 s), not one per submit.
    assert readings <= took / settings.admission.refresh_s + 3, (readings, took)


def _worker_lines(records: list[logging.LogRecord], since: float) -> list[str]:
    return [
        r.getMessage()
        for r in records
        if r.created >= since and r.levelno >= logging.WARNING and r.name.startswith("flow_api")
    ]


@pytest.mark.timeout(60)
async def test_a_worker_waits_out_a_redis_refusing_writes_quietly_and_recovers(
    api: Api,
    start_worker: WorkerFactory,
    redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    ids = [await api.submit(f"job {n}", **SHORT_ANSWER) for n in range(30)]
    used = int((await redis.info("memory"))["used_memory"])
    await redis.config_set("maxmemory", used // 2)  # every write is refused from now on
    caplog.set_level(logging.INFO)

    started = time.time()
    worker: FlowWorker = await start_worker()
    await asyncio.sleep(4)
    assert worker.consumer is not None and worker.consumer.slots is not None
    backoff = worker.consumer.slots.backoff
    lines = _worker_lines(caplog.records, started)
    took = time.time() - started
    assert backoff.troubled and backoff.total_errors > 0
    # 20 slots retrying at once would fail thousands of times in 4 s (the bug: a hot loop).
    assert backoff.total_errors < 300, backoff.total_errors
    assert len(lines) <= took + 1, lines
    assert (await api.status(ids[0]))["status"] == "waiting"

    await redis.config_set("maxmemory", 0)  # memory frees
    for job_id in ids:
        assert (await api.wait(job_id, timeout_s=20))["status"] == "completed"
    # The episode ends with a success after `quiet_s` without failures (an idle take returns
    # within a few seconds); it says so once.
    for _ in range(150):
        if not backoff.troubled:
            break
        await asyncio.sleep(0.1)
    assert not backoff.troubled
    assert any("answers the worker again" in r.getMessage() for r in caplog.records)


@pytest.mark.timeout(60)
async def test_a_finish_redis_refuses_is_retried_without_calling_the_provider_again(
    full_valkey: EmbeddedValkey, simulator: Simulator, start_worker: WorkerFactory, redis: Redis
) -> None:
    # A finish is not refused for memory under `noeviction` (its first write frees the job's
    # lock, and Redis lets a script that has written go on), and a stopped Redis is waited out
    # inside bullmq's connection. A failover is neither: the server turned replica refuses
    # every write with READONLY until it is primary again.
    settings = cloud_settings(full_valkey.url, simulator.url)
    simulator.config.latency_s = 1.0
    async with serving(settings) as api:
        worker: FlowWorker = await start_worker(settings)
        job_id = await api.submit("one answer, paid for once")
        await api.wait_for(job_id, {"active"}, timeout_s=10)
        await redis.execute_command("REPLICAOF", "127.0.0.1", str(free_port()))  # no primary there
        await asyncio.sleep(2.5)  # the answer came at ~1 s; its finish keeps being refused
        assert worker.consumer is not None and worker.consumer.slots is not None
        assert worker.consumer.slots.backoff.total_errors > 0
        assert (await api.status(job_id))["status"] == "active"
        await redis.execute_command("REPLICAOF", "NO", "ONE")
        assert (await api.wait(job_id, timeout_s=20))["status"] == "completed"
    assert simulator.stats.requests == 1
