"""Cancellation, idempotent submit and start deadlines, over real HTTP and Valkey."""

from __future__ import annotations

import asyncio
from typing import Any

from flow_api.providers import ProviderRegistry
from flow_api.settings import Settings
from tests.support import Api, WorkerFactory
from tests.support.scripted import ScriptedProvider


async def status_of(api: Api, job_id: str) -> dict[str, Any]:
    body: dict[str, Any] = (await api.client.get(f"/api/ai/status/{job_id}")).json()
    return body


async def wait_for_status(api: Api, job_id: str, wanted: str, timeout_s: float = 10) -> None:
    for _ in range(int(timeout_s / 0.05)):
        if (await status_of(api, job_id))["status"] == wanted:
            return
        await asyncio.sleep(0.05)
    raise AssertionError(f"{job_id} never reached {wanted}: {await status_of(api, job_id)}")


async def test_cancel_a_waiting_job_makes_no_provider_call(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    job_id = await api.submit("never run me")
    answer = await api.client.post(f"/api/ai/jobs/{job_id}/cancel")
    assert answer.status_code == 200
    assert answer.json()["status"] == "cancelled"
    assert (await status_of(api, job_id))["status"] == "cancelled"
    result = await api.client.get(f"/api/ai/result/{job_id}")
    assert result.status_code == 409
    assert result.json()["error"]["code"] == "job_cancelled"

    again = await api.client.post(f"/api/ai/jobs/{job_id}/cancel")
    assert again.status_code == 409
    assert again.json()["error"]["code"] == "job_already_finished"

    provider = ScriptedProvider({})
    await start_worker(settings, ProviderRegistry([provider]))
    other = await api.submit("run me")  # proves the worker is consuming
    assert (await api.wait(other))["status"] == "completed"
    record = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
    assert record["status"] == "cancelled"
    assert provider.model.calls == {"run me": 1}
    assert record["attempts"][0]["error"]["code"] == "cancelled"


async def test_cancel_an_active_job_aborts_the_provider_call(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    provider = ScriptedProvider({"slow": [30.0]})
    await start_worker(settings, ProviderRegistry([provider]))
    job_id = await api.submit("slow", timeoutMs=60_000)
    await wait_for_status(api, job_id, "active")
    await asyncio.sleep(0.1)  # let the call begin
    started = asyncio.get_running_loop().time()
    answer = await api.client.delete(f"/api/ai/jobs/{job_id}")
    assert answer.status_code == 200
    for _ in range(100):
        record = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
        if record["attempts"] and record["attempts"][-1].get("error"):
            break
        await asyncio.sleep(0.05)
    assert asyncio.get_running_loop().time() - started < 5
    assert record["status"] == "cancelled"
    assert record["attempts"][-1]["error"]["code"] == "cancelled"
    assert provider.model.aborted == ["slow"]  # the in-flight call was interrupted
    assert provider.model.calls == {"slow": 1}  # and not retried


async def test_cancel_a_finished_or_unknown_job(api: Api, worker: Any) -> None:
    job_id = await api.submit("quick")
    await api.wait(job_id)
    finished = await api.client.post(f"/api/ai/jobs/{job_id}/cancel")
    assert finished.status_code == 409
    assert finished.json()["error"]["code"] == "job_already_finished"
    assert "completed" in finished.json()["error"]["message"]
    missing = await api.client.delete("/api/ai/jobs/nope")
    assert missing.status_code == 404


async def test_idempotency_key_returns_the_same_job(api: Api) -> None:
    body = {"prompt": "once", "options": {"temperature": 0.1}}
    headers = {"Idempotency-Key": "order-42"}
    first = await api.client.post("/api/ai/generate", json=body, headers=headers)
    second = await api.client.post("/api/ai/generate", json=body, headers=headers)
    assert first.status_code == second.status_code == 202
    assert first.json()["jobId"] == second.json()["jobId"]
    assert second.headers["idempotent-replayed"] == "true"
    waiting = await api.client.get(f"/api/ai/status/{first.json()['jobId']}")
    assert waiting.status_code == 200

    changed = await api.client.post("/api/ai/generate", json={"prompt": "twice"}, headers=headers)
    assert changed.status_code == 409
    assert changed.json()["error"]["code"] == "idempotency_key_reused"

    other = await api.client.post("/api/ai/generate", json=body, headers={"Idempotency-Key": "x"})
    assert other.json()["jobId"] != first.json()["jobId"]
    too_long = await api.client.post(
        "/api/ai/generate", json=body, headers={"Idempotency-Key": "k" * 300}
    )
    assert too_long.status_code == 422


async def test_concurrent_submits_with_one_key_create_one_job(api: Api) -> None:
    body = {"prompt": "race"}
    answers = await asyncio.gather(
        *(
            api.client.post("/api/ai/generate", json=body, headers={"Idempotency-Key": "r"})
            for _ in range(20)
        )
    )
    assert {a.status_code for a in answers} == {202}
    assert len({a.json()["jobId"] for a in answers}) == 1


async def test_a_job_not_started_by_its_deadline_expires(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    late = await api.submit("too late", startWithinMs=200)
    timely = await api.submit("in time", startWithinMs=60_000)
    await asyncio.sleep(0.4)
    view = await status_of(api, late)
    assert view["status"] == "expired"
    assert view["error"]["code"] == "expired"

    provider = ScriptedProvider({})
    await start_worker(settings, ProviderRegistry([provider]))
    assert (await api.wait(timely))["status"] == "completed"
    await wait_for_status(api, late, "expired")
    record = (await api.client.get(f"/api/ai/jobs/{late}")).json()
    assert record["attempts"][0]["error"]["code"] == "expired"
    assert "too late" not in provider.model.calls
    result = await api.client.get(f"/api/ai/result/{late}")
    assert result.status_code == 409 and result.json()["error"]["code"] == "job_expired"
