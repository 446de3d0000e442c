"""What the README says expires: an `Idempotency-Key` after `FLOW_API_IDEMPOTENCY_TTL_S`, and
finished jobs after `FLOW_WORKER_RETENTION_S` (BullMQ's own age-based removal)."""

from __future__ import annotations

import asyncio
import time

import orjson

from flow_api.queue.connection import connect
from flow_api.settings import Settings
from tests.support import Api, WorkerFactory, serving


async def test_an_idempotency_key_is_forgotten_after_its_ttl(settings: Settings) -> None:
    settings.api.idempotency_ttl_s = 1
    body = {"prompt": "charge order 42 once"}
    headers = {"Idempotency-Key": "order-42"}
    redis = connect(settings.redis)
    try:
        async with serving(settings) as api:
            first = await api.client.post("/api/ai/generate", json=body, headers=headers)
            replay = await api.client.post("/api/ai/generate", json=body, headers=headers)
            assert first.status_code == replay.status_code == 202
            assert replay.json()["jobId"] == first.json()["jobId"]
            assert replay.headers.get("idempotent-replayed") == "true"
            pattern = f"flow:{settings.redis.queue_name}:idem:*"
            remembered = [k async for k in redis.scan_iter(match=pattern)]
            assert len(remembered) == 1
            assert 0 < await redis.pttl(remembered[0]) <= 1000  # the configured TTL
            deadline = time.monotonic() + 10
            while await redis.exists(remembered[0]):  # Redis expires it; nothing else does
                assert time.monotonic() < deadline, "the idempotency record never expired"
                await asyncio.sleep(0.05)
            later = await api.client.post("/api/ai/generate", json=body, headers=headers)
    finally:
        await redis.aclose()
    assert later.status_code == 202
    assert later.json()["jobId"] != first.json()["jobId"]  # a new job: the key was forgotten
    assert "idempotent-replayed" not in later.headers


async def test_finished_jobs_carry_the_retention_as_bullmqs_removal_age(
    api: Api, settings: Settings, start_worker: WorkerFactory
) -> None:
    # BullMQ removes a finished job once it is older than `removeOnComplete.age` (and
    # `removeOnFail.age`) when later jobs finish; the setting's floor is 60 s, so this test
    # checks the age every stored job carries rather than waiting a minute for the removal.
    await start_worker()
    done = await api.submit("kept for the retention")
    assert (await api.wait(done))["status"] == "completed"
    redis = connect(settings.redis)
    try:
        key = f"{settings.redis.prefix}:{settings.redis.queue_name}:{done}"
        opts = orjson.loads(await redis.hget(key, "opts"))
    finally:
        await redis.aclose()
    retention = settings.worker.retention_s
    assert opts["removeOnComplete"] == {"age": retention}, opts
    assert opts["removeOnFail"] == {"age": retention}, opts
