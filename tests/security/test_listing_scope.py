"""Listing and counts are per tenant and need the `read` scope; streams too."""

from __future__ import annotations

from tests.security.conftest import KeyMaker


async def test_each_tenant_lists_and_counts_only_its_own_jobs(caller: KeyMaker) -> None:
    acme, globex = await caller("acme"), await caller("globex")
    acme_jobs = [await acme.submit(f"acme {n}") for n in range(3)]
    globex_job = await globex.submit("globex")

    listed = (await acme.get("/api/ai/jobs")).json()
    assert [j["jobId"] for j in listed["jobs"]] == acme_jobs[::-1]
    assert [j["jobId"] for j in (await globex.get("/api/ai/jobs")).json()["jobs"]] == [globex_job]

    counts = (await acme.get("/api/ai/queue")).json()
    assert counts["states"]["waiting"] == 3 and counts["counted"] == 3
    assert (await globex.get("/api/ai/queue")).json()["counted"] == 1


async def test_listing_counts_and_streams_need_the_read_scope(caller: KeyMaker) -> None:
    submitter = await caller("acme", scopes="submit")
    job_id = await submitter.submit("mine")
    for path in ("/api/ai/jobs", "/api/ai/queue", f"/api/ai/stream/{job_id}"):
        answer = await submitter.get(path)
        assert answer.status_code == 403, (path, answer.text)
        assert answer.json()["error"]["code"] == "forbidden"
        anonymous = await submitter.client.get(path)
        assert anonymous.status_code == 401, (path, anonymous.text)
