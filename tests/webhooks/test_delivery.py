"""Signed deliveries end to end: real API, real worker, real Valkey, a loopback receiver that
verifies each request with the `standardwebhooks` library."""

from __future__ import annotations

import asyncio

import orjson

from flow_api.worker import FlowWorker
from tests.support import Api, WorkerFactory
from tests.webhooks.receiver import ANSWER_BODY, Receiver


async def test_a_failing_receiver_gets_the_same_event_until_it_answers_200(
    api: Api, worker: FlowWorker, receiver: Receiver, secret: str
) -> None:
    receiver.statuses.extend([500, 500])
    job_id = await api.submit("hello hooks", webhook={"url": receiver.url}, metadata={"run": 7})
    assert (await api.wait(job_id))["status"] == "completed"
    got = await receiver.wait_for(3)
    await asyncio.sleep(0.8)  # past the whole shortened schedule: nothing more comes
    assert len(receiver.received) == 3
    assert {r.event_id for r in got} == {f"evt_{job_id}"}
    assert len({r.body for r in got}) == 1, "every attempt sends the same bytes"
    payload = got[-1].verify(secret)
    assert payload["type"] == "job.completed"
    assert payload["data"]["jobId"] == job_id
    assert payload["data"]["status"] == "completed"
    assert payload["data"]["metadata"] == {"run": 7}
    assert payload["timestamp"] == payload["data"]["finishedAt"]
    assert got[0].headers["content-type"] == "application/json"
    record = await api.record(job_id)
    attempts = record["webhooks"]
    assert [a["statusCode"] for a in attempts] == [500, 500, 200]
    assert [a["attempt"] for a in attempts] == [1, 2, 3]
    assert [a["delivered"] for a in attempts] == [False, False, True]
    assert attempts[0]["error"] == "the receiver answered 500"
    assert ANSWER_BODY not in orjson.dumps(record).decode()


async def test_a_receiver_that_never_answers_2xx_gets_every_scheduled_attempt(
    api: Api, worker: FlowWorker, receiver: Receiver, secret: str
) -> None:
    receiver.statuses.extend([503] * 10)
    job_id = await api.submit("never", webhook={"url": receiver.url})
    await api.wait(job_id)
    await receiver.wait_for(4)  # the first attempt and the three retries of the schedule
    await asyncio.sleep(1.0)
    assert len(receiver.received) == 4
    record = await api.record(job_id)
    assert [a["delivered"] for a in record["webhooks"]] == [False] * 4


async def test_only_subscribed_endings_are_sent(
    api: Api, worker: FlowWorker, receiver: Receiver, secret: str
) -> None:
    quiet = await api.submit("x", webhook={"url": receiver.url, "events": ["failed"]})
    sent = await api.submit("y", webhook={"url": receiver.url, "events": ["completed"]})
    await api.wait(quiet)
    await api.wait(sent)
    got = await receiver.wait_for(1)
    await asyncio.sleep(0.5)
    assert [r.event_id for r in receiver.received] == [f"evt_{sent}"]
    assert got[0].verify(secret)["type"] == "job.completed"
    assert (await api.record(quiet))["webhooks"] == []


async def test_cancelled_and_expired_jobs_send_their_ending(
    api: Api, start_worker: WorkerFactory, receiver: Receiver, secret: str
) -> None:
    """Both are decided by the worker that takes the job (no provider call)."""
    cancelled = await api.submit("c", webhook={"url": receiver.url})
    expired = await api.submit("e", webhook={"url": receiver.url}, startWithinMs=1)
    assert (await api.post(f"/api/ai/jobs/{cancelled}/cancel")).status_code == 200
    await asyncio.sleep(0.05)
    await start_worker()
    got = await receiver.wait_for(2)
    kinds = {r.event_id: r.verify(secret)["type"] for r in got}
    assert kinds == {f"evt_{cancelled}": "job.cancelled", f"evt_{expired}": "job.expired"}
    assert (await api.status(expired))["status"] == "expired"
