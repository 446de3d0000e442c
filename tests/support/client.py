"""One HTTP client for the API in tests: submit, poll to an end, read records."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx

from flow_api.models import JobStatus
from flow_api.settings import Settings

TERMINAL = frozenset(status.value for status in JobStatus if status.finished)
"""Every status a job ends in: completed, failed, cancelled, expired."""


class JobClient:
    """The API as one caller sees it (`headers`, for example an API key, on every request)."""

    def __init__(self, client: httpx.AsyncClient, headers: dict[str, str] | None = None) -> None:
        self.client = client
        self.headers = dict(headers or {})

    async def post(
        self, path: str, body: Any = None, headers: dict[str, str] | None = None
    ) -> httpx.Response:
        return await self.client.post(path, json=body, headers={**self.headers, **(headers or {})})

    async def get(self, path: str) -> httpx.Response:
        return await self.client.get(path, headers=self.headers)

    async def delete(self, path: str) -> httpx.Response:
        return await self.client.delete(path, headers=self.headers)

    async def submit(self, prompt: str, **options: Any) -> str:
        """`POST /api/ai/generate`; asserts the 202 and returns the job id."""
        answer = await self.post("/api/ai/generate", {"prompt": prompt, "options": options})
        assert answer.status_code == 202, answer.text
        job_id: str = answer.json()["jobId"]
        return job_id

    async def status(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = (await self.get(f"/api/ai/status/{job_id}")).json()
        return body

    async def record(self, job_id: str) -> dict[str, Any]:
        body: dict[str, Any] = (await self.get(f"/api/ai/jobs/{job_id}")).json()
        return body

    async def wait(self, job_id: str, timeout_s: float = 20) -> dict[str, Any]:
        """Poll status until the job reaches a terminal status; returns that status body."""
        return await self.wait_for(job_id, TERMINAL, timeout_s)

    async def wait_for(
        self, job_id: str, statuses: frozenset[str] | set[str], timeout_s: float = 20
    ) -> dict[str, Any]:
        """Poll status until it is one of `statuses`."""
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            body = await self.status(job_id)
            if body["status"] in statuses:
                return body
            assert asyncio.get_running_loop().time() < deadline, f"job {job_id} stuck: {body}"
            await asyncio.sleep(0.02 if statuses != TERMINAL else 0.05)


class Api(JobClient):
    """A client of a real API server started with `settings`."""

    def __init__(self, settings: Settings, client: httpx.AsyncClient) -> None:
        super().__init__(client)
        self.settings = settings
