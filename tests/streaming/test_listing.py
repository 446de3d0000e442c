"""`GET /api/ai/jobs` and `GET /api/ai/queue` over real HTTP and Valkey."""

from __future__ import annotations

import asyncio
from datetime import datetime
from typing import Any

from tests.support import Api, WorkerFactory


async def submit_many(api: Api, count: int, parallel: int = 16, **options: Any) -> list[str]:
    ids: list[str] = []
    lock = asyncio.Semaphore(parallel)

    async def one(n: int) -> None:
        async with lock:
            ids.append(await api.submit(f"job {n}", **options))

    await asyncio.gather(*(one(n) for n in range(count)))
    return ids


async def list_all(api: Api, query: str = "", limit: int = 37) -> list[dict[str, Any]]:
    jobs: list[dict[str, Any]] = []
    cursor: str | None = None
    while True:
        page = await api.client.get(
            f"/api/ai/jobs?limit={limit}{query}" + (f"&cursor={cursor}" if cursor else "")
        )
        assert page.status_code == 200, page.text
        body = page.json()
        assert len(body["jobs"]) <= limit
        jobs.extend(body["jobs"])
        cursor = body.get("nextCursor")
        if cursor is None:
            return jobs


async def test_paging_1000_jobs_during_inserts_has_no_duplicates_or_gaps(api: Api) -> None:
    before = await submit_many(api, 1000)
    seen: list[dict[str, Any]] = []
    cursor: str | None = None
    inserting = asyncio.create_task(submit_many(api, 300, parallel=4))
    pages = 0
    while True:
        query = "/api/ai/jobs?limit=50" + (f"&cursor={cursor}" if cursor else "")
        body = (await api.client.get(query)).json()
        seen.extend(body["jobs"])
        pages += 1
        cursor = body.get("nextCursor")
        if cursor is None:
            break
        await asyncio.sleep(0.01)  # let the inserts interleave with the paging
    during = set(await inserting)
    ids = [job["jobId"] for job in seen]
    assert len(ids) == len(set(ids)), "no job listed twice"
    assert set(before) <= set(ids), "every job that existed when paging began is listed"
    assert set(ids) <= set(before) | during
    assert pages > 20
    created = [datetime.fromisoformat(job["createdAt"]) for job in seen]
    assert created == sorted(created, reverse=True), "newest first"
    # Paged again once the inserts are over: every job, once, newest first.
    everything = await list_all(api, limit=100)
    assert len(everything) == len(before) + len(during)
    assert {j["jobId"] for j in everything} == set(before) | during
    created = [datetime.fromisoformat(job["createdAt"]) for job in everything]
    assert created == sorted(created, reverse=True)


async def test_filters_status_metadata_and_created_after(
    api: Api, start_worker: WorkerFactory
) -> None:
    cancelled = await api.submit("cancel me", metadata={"team": "blue"})
    await api.client.post(f"/api/ai/jobs/{cancelled}/cancel")
    assert (await api.wait(cancelled))["status"] == "cancelled"
    await start_worker()
    done = [await api.submit(f"done {n}", metadata={"team": "red", "n": n}) for n in range(3)]
    for job_id in done:
        assert (await api.wait(job_id))["status"] == "completed"

    assert [j["jobId"] for j in await list_all(api, "&status=completed")] == done[::-1]
    assert [j["jobId"] for j in await list_all(api, "&status=cancelled")] == [cancelled]
    assert await list_all(api, "&status=failed") == []
    assert [j["jobId"] for j in await list_all(api, "&metadata.team=red")] == done[::-1]
    assert [j["jobId"] for j in await list_all(api, "&metadata.n=1")] == [done[1]]
    assert [j["jobId"] for j in await list_all(api, "&metadata.team=blue&status=completed")] == []
    assert await list_all(api, "&metadata.missing=x") == []

    second = (await api.status(done[1]))["createdAt"]
    after = datetime.fromisoformat(second)
    newer = await list_all(api, f"&createdAfter={int(after.timestamp() * 1000)}")
    assert [j["jobId"] for j in newer] == [done[2]]
    iso = await list_all(api, "&createdAfter=" + after.isoformat().replace("+00:00", "Z"))
    assert [j["jobId"] for j in iso] == [done[2]]
    every = await list_all(api, limit=1)
    assert [j["jobId"] for j in every] == [*done[::-1], cancelled]

    counts = (await api.client.get("/api/ai/queue")).json()
    assert counts["states"] == {
        "waiting": 0,
        "active": 0,
        "completed": 3,
        "failed": 0,
        "cancelled": 1,
        "expired": 0,
    }
    assert counts["providers"] == {"fake": {"completed": 3, "cancelled": 1}}
    assert counts["counted"] == 4 and counts["complete"] is True


async def test_a_waiting_job_counts_as_waiting(api: Api) -> None:
    await api.submit("no worker")
    counts = (await api.client.get("/api/ai/queue")).json()
    assert counts["states"]["waiting"] == 1
    assert counts["providers"] == {"fake": {"waiting": 1}}


async def test_bad_queries_are_422_with_the_field(api: Api) -> None:
    for query, field in (
        ("cursor=nonsense", "cursor"),
        ("status=nope", "status"),
        ("limit=0", "limit"),
        ("limit=101", "limit"),
        ("createdAfter=yesterday", "createdAfter"),
        ("createdAfter=0.5", "createdAfter"),  # a number is whole milliseconds, not seconds
        ("createdAfter=1e3", "createdAfter"),
    ):
        answer = await api.client.get(f"/api/ai/jobs?{query}")
        assert answer.status_code == 422, (query, answer.text)
        error = answer.json()["error"]
        named = {error.get("field"), *(d["field"] for d in error.get("details", []))}
        assert named & {field, f"query.{field}"}, (query, error)
