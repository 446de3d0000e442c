"""Tenants and keys over real HTTP: each tenant sees only its own jobs; bad keys get 401."""

from __future__ import annotations

import asyncio
import time
from datetime import timedelta

import httpx
import pytest

from flow_api.auth.api_keys import ApiKeyStore
from flow_api.embedded import free_port
from flow_api.settings import AuthSettings, Settings
from flow_api.worker import FlowWorker
from tests.security.conftest import KeyMaker
from tests.support import Api, start_api

READS = ["status", "result", "jobs", "stream"]


def assert_not_found(answer: httpx.Response, job_id: str) -> None:
    assert answer.status_code == 404, answer.text
    assert answer.json() == {
        "error": {
            "code": "job_not_found",
            "message": f"no job with id {job_id!r} (it may have expired)",
        }
    }


async def test_each_tenant_is_denied_the_others_jobs_on_every_endpoint(
    caller: KeyMaker, worker: FlowWorker
) -> None:
    acme, globex = await caller("acme"), await caller("globex")
    acme_job = await acme.submit("acme's secret plan")
    globex_job = await globex.submit("globex's secret plan")
    assert (await acme.wait(acme_job))["status"] == "completed"
    assert (await globex.wait(globex_job))["status"] == "completed"

    for owner, other, job_id in ((acme, globex, acme_job), (globex, acme, globex_job)):
        for path in READS:
            assert (await owner.get(f"/api/ai/{path}/{job_id}")).status_code == 200
            # The same answer as for an id that never existed: ids reveal nothing.
            assert_not_found(await other.get(f"/api/ai/{path}/{job_id}"), job_id)
        assert_not_found(await other.post(f"/api/ai/jobs/{job_id}/cancel"), job_id)
        assert_not_found(await other.delete(f"/api/ai/jobs/{job_id}"), job_id)

    result = (await acme.get(f"/api/ai/result/{acme_job}")).json()
    assert result["result"]["text"] == "echo: acme's secret plan"


async def test_another_tenant_cannot_cancel_a_waiting_job(caller: KeyMaker) -> None:
    acme, globex = await caller("acme"), await caller("globex")
    job_id = await acme.submit("no worker yet")
    assert_not_found(await globex.post(f"/api/ai/jobs/{job_id}/cancel"), job_id)
    assert_not_found(await globex.delete(f"/api/ai/jobs/{job_id}"), job_id)
    assert (await acme.get(f"/api/ai/status/{job_id}")).json()["status"] == "waiting"
    cancelled = await acme.post(f"/api/ai/jobs/{job_id}/cancel")
    assert cancelled.status_code == 200
    assert cancelled.json()["status"] == "cancelled"


async def test_keys_of_one_tenant_share_its_jobs(caller: KeyMaker) -> None:
    ci, laptop = await caller("acme"), await caller("acme")
    job_id = await ci.submit("shared within the team")
    assert (await laptop.get(f"/api/ai/status/{job_id}")).status_code == 200


async def test_idempotency_keys_are_scoped_to_the_tenant(caller: KeyMaker) -> None:
    acme, globex = await caller("acme"), await caller("globex")
    body = {"prompt": "same body"}
    headers = {"Idempotency-Key": "nightly-1"}
    first = await acme.post("/api/ai/generate", body, headers)
    second = await globex.post("/api/ai/generate", body, headers)
    replay = await acme.post("/api/ai/generate", body, headers)
    assert replay.headers["idempotent-replayed"] == "true"
    assert replay.json()["jobId"] == first.json()["jobId"]
    assert first.status_code == second.status_code == 202
    # globex gets its own job, not a replay that would hand it acme's job id.
    assert "idempotent-replayed" not in second.headers
    assert first.json()["jobId"] != second.json()["jobId"]


async def test_revoked_key_is_refused_on_the_next_request(
    caller: KeyMaker, store: ApiKeyStore
) -> None:
    acme = await caller("acme")
    job_id = await acme.submit("before revocation")
    assert await store.revoke(acme.record.id) is not None
    for answer in (
        await acme.get(f"/api/ai/status/{job_id}"),
        await acme.post("/api/ai/generate", {"prompt": "after revocation"}),
    ):
        assert answer.status_code == 401
        assert answer.json()["error"]["code"] == "unauthorized"
    assert await store.revoke(acme.record.id) is None


async def test_expired_key_is_refused(caller: KeyMaker) -> None:
    brief = await caller("acme", expires_in=timedelta(seconds=5))  # room for a slow machine
    assert (await brief.post("/api/ai/generate", {"prompt": "in time"})).status_code == 202
    expires_at = brief.record.expires_at
    assert expires_at is not None
    await asyncio.sleep(max(0.0, expires_at.timestamp() - time.time()) + 0.1)  # past it
    late = await brief.post("/api/ai/generate", {"prompt": "too late"})
    assert late.status_code == 401
    assert late.json()["error"]["code"] == "unauthorized"


async def test_read_only_key_cannot_submit_or_cancel(caller: KeyMaker) -> None:
    writer, reader = await caller("acme"), await caller("acme", scopes="read")
    job_id = await writer.submit("written by ci")
    refused = await reader.post("/api/ai/generate", {"prompt": "hi"})
    assert refused.status_code == 403
    assert refused.json()["error"] == {
        "code": "forbidden",
        "message": "this API key lacks the 'submit' scope",
    }
    assert (await reader.post(f"/api/ai/jobs/{job_id}/cancel")).status_code == 403
    assert (await reader.get(f"/api/ai/status/{job_id}")).status_code == 200


async def test_submit_only_key_cannot_read_and_admin_can_do_both(caller: KeyMaker) -> None:
    submitter, admin = await caller("acme", scopes="submit"), await caller("acme", scopes="admin")
    job_id = await submitter.submit("fire and forget")
    answer = await submitter.get(f"/api/ai/status/{job_id}")
    assert answer.status_code == 403
    assert answer.json()["error"]["code"] == "forbidden"
    assert (await admin.get(f"/api/ai/jobs/{job_id}")).status_code == 200
    await admin.submit("admin may submit")


@pytest.mark.parametrize(
    "authorization",
    [
        None,
        "",
        "Bearer",
        "Basic YWxhZGRpbjpvcGVuc2VzYW1l",
        "Bearer not-a-key",
        "Bearer flow_" + "A" * 43,  # the right shape, but no such key
        "flow_" + "A" * 43,  # no scheme
    ],
)
async def test_missing_or_malformed_authorization_is_401_json(
    api: Api, authorization: str | None
) -> None:
    headers = {} if authorization is None else {"Authorization": authorization}
    for answer in (
        await api.client.post("/api/ai/generate", json={"prompt": "hi"}, headers=headers),
        await api.client.get("/api/ai/status/some-job", headers=headers),
    ):
        assert answer.status_code == 401
        assert answer.headers["content-type"] == "application/json"
        assert answer.headers["www-authenticate"].startswith("Bearer")
        error = answer.json()["error"]
        assert error["code"] == "unauthorized"
        assert "flow_" not in error["message"]  # the key is never echoed


async def test_health_and_docs_need_no_key(api: Api) -> None:
    assert (await api.client.get("/healthz")).status_code == 200
    assert (await api.client.get("/readyz")).status_code == 200
    spec = (await api.client.get("/openapi.json")).json()
    assert spec["components"]["securitySchemes"]["HTTPBearer"]["scheme"] == "bearer"


async def test_jobs_submitted_while_auth_was_off_belong_to_tenant_default(
    caller: KeyMaker, settings: Settings
) -> None:
    """Auth off: every request is tenant `default` with all scopes; turning auth on later, only
    that tenant's keys see those jobs."""
    open_settings = settings.model_copy(
        update={
            "auth": AuthSettings(enabled=False),
            "api": settings.api.model_copy(update={"port": free_port()}),
        }
    )
    server, task = await start_api(open_settings)
    try:
        base = f"http://127.0.0.1:{open_settings.api.port}"
        async with httpx.AsyncClient(base_url=base) as client:
            answer = await client.post("/api/ai/generate", json={"prompt": "no key needed"})
            assert answer.status_code == 202
            job_id = answer.json()["jobId"]
            assert (await client.get(f"/api/ai/jobs/{job_id}")).status_code == 200
            cancel = await client.post(f"/api/ai/jobs/{job_id}/cancel")
            assert cancel.status_code == 200
    finally:
        server.should_exit = True
        await task
    default, acme = await caller("default"), await caller("acme")
    assert (await default.get(f"/api/ai/status/{job_id}")).status_code == 200
    assert_not_found(await acme.get(f"/api/ai/status/{job_id}"), job_id)
