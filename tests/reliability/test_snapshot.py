"""Every answer about a job is a state the job was really in (issue 21).

Clients poll status as fast as they can while jobs finish; every answer must be consistent:
`completed` ⇒ attempts ≥ 1 and a result; `failed` ⇒ an error; `active` ⇒ `startedAt`; and
timestamps never go backwards between two reads of a job. Before the store read a job in one
snapshot, about a third of fast-polled completions said `"attempts": 0`.

`FLOW_SNAPSHOT_JOBS` sets the number of jobs (default 200; the issue's run used 10 000). Jobs are
submitted and polled in waves of at most 1 000 (the issue's run: 1 000 clients polling at once), so
a long run measures the store, not one test process juggling 10 000 pollers.
"""

from __future__ import annotations

import asyncio
import os
from typing import Any

import httpx
import pytest

from flow_api.settings import Settings, WorkerSettings
from flow_api.testing import Simulator
from tests.support import TERMINAL, Api, WorkerFactory

JOBS = int(os.environ.get("FLOW_SNAPSHOT_JOBS", "200"))
WAVE = 1000
STAMPS = ("createdAt", "startedAt", "finishedAt")


def problems_in(body: dict[str, Any], before: dict[str, Any] | None) -> list[str]:
    found = []
    status = body["status"]
    if status == "completed" and body.get("attempts", 0) < 1:
        found.append("completed with 0 attempts")
    if status == "failed" and not body.get("error"):
        found.append("failed without an error")
    if status == "active" and not body.get("startedAt"):
        found.append("active without startedAt")
    if before is not None:
        for stamp in STAMPS:
            if before.get(stamp) and (not body.get(stamp) or body[stamp] < before[stamp]):
                found.append(f"{stamp} went back: {before[stamp]} -> {body.get(stamp)}")
    return found


CONNECTIONS = 100
"""Reads in flight at once: httpx's pool (100 connections) hands queued requests out in time
quadratic in the queue, so a thousand pollers queueing on it starve the test's own event loop
(which also runs the API and the worker); they take turns on a semaphore instead."""


async def read_status(api: Api, job_id: str, turns: asyncio.Semaphore) -> dict[str, Any]:
    """One status read; a keep-alive connection the server closed as it was reused is read again
    (what any HTTP client does for a GET), so the test counts answers, not socket races."""
    async with turns:
        for _ in range(3):
            try:
                return await api.status(job_id)
            except (httpx.ReadError, httpx.RemoteProtocolError):
                continue
        return await api.status(job_id)


async def submit(api: Api, prompt: str, turns: asyncio.Semaphore) -> str:
    async with turns:
        return await api.submit(prompt)


async def poll(api: Api, job_id: str, turns: asyncio.Semaphore) -> list[str]:
    """Poll one job until it ends, then read its result; the inconsistencies seen."""
    found: list[str] = []
    before: dict[str, Any] | None = None
    while True:
        body = await read_status(api, job_id, turns)
        found += [f"{job_id}: {p} in {body}" for p in problems_in(body, before)]
        before = body
        if body["status"] in TERMINAL:
            break
        await asyncio.sleep(0.001)
    if body["status"] == "completed":
        async with turns:
            answer = await api.get(f"/api/ai/result/{job_id}")
        if answer.status_code != 200 or not answer.json().get("result"):
            found.append(f"{job_id}: completed, but /result answered {answer.text}")
    return found


@pytest.mark.timeout(120 + JOBS // 2)
async def test_fast_polling_sees_only_consistent_answers(
    api: Api, settings: Settings, simulator: Simulator, start_worker: WorkerFactory
) -> None:
    simulator.config.latency_s = 0.03
    worker = settings.model_copy(
        update={"worker": WorkerSettings(**{**settings.worker.model_dump(), "concurrency": 100})}
    )
    await start_worker(worker)
    turns = asyncio.Semaphore(CONNECTIONS)
    found: list[str] = []
    for start in range(0, JOBS, WAVE):
        wave = range(start, min(start + WAVE, JOBS))
        ids = await asyncio.gather(*(submit(api, f"snapshot {i}", turns) for i in wave))
        found += [p for ps in await asyncio.gather(*(poll(api, i, turns) for i in ids)) for p in ps]
        print(f"{wave.stop} jobs polled; {len(found)} inconsistent answers so far", flush=True)
    print(f"\n{JOBS} jobs polled; {len(found)} inconsistent answers")
    assert found == [], found[:10]
