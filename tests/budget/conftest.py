"""Fixtures for the rate budget: the provider simulator and settings pointing workers at it."""

from __future__ import annotations

import itertools
from collections.abc import AsyncIterator, Awaitable, Callable
from typing import Any

import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.jobs import JobData
from flow_api.models import GenerateRequest
from flow_api.queue.connection import connect
from flow_api.queue.consumer import JobDeferred, JobHandle
from flow_api.queue.producer import JobQueue
from flow_api.queue.slot_worker import SlotWorker
from flow_api.settings import (
    BudgetLimit,
    BudgetSettings,
    OpenAISettings,
    ProviderSettings,
    Settings,
)
from flow_api.testing import Simulator
from tests.support import make_settings

MODEL = "gpt-sim"


def budget_settings(
    valkey: EmbeddedValkey, sim: Simulator | None, limits: dict[str, BudgetLimit], **extra: Any
) -> Settings:
    """Test settings with these budget limits; OpenAI on the simulator when there is one."""
    sections: dict[str, Any] = {"budget": BudgetSettings(limits=limits, **extra)}
    if sim is not None:
        sections["provider"] = ProviderSettings(default="openai", fake_enabled=True)
        sections["openai"] = OpenAISettings(
            api_key="sk-test-not-a-real-key", base_url=sim.base_url, model=MODEL
        )
    return make_settings(valkey.url, **sections)


class TakenJobs:
    """Jobs of the real queue, taken the way a worker takes them (BullMQ's `moveToActive`, with
    a lock token) by a `SlotWorker` that is never run: `JobHandle`s whose `defer` runs BullMQ's
    `moveToDelayed`, so the budget's put-back path is the production one."""

    def __init__(self, settings: Settings) -> None:
        # A queue of its own: a worker the test runs on the settings' queue never takes these.
        # (The budget's keys are named by `settings`' queue either way.)
        own = settings.redis.model_copy(update={"queue_name": f"{settings.redis.queue_name}-t"})
        self.redis = connect(own)
        self.queue = JobQueue(self.redis, own, settings.worker)
        options = {"connection": own.url, "prefix": own.prefix}
        self.worker = SlotWorker(own.queue_name, _never_run, options)
        self._tokens = itertools.count(1)

    async def take(self, prompt: str = "budget") -> JobHandle:
        """Enqueue a job and take it: active, locked, attempt 1."""
        request = GenerateRequest(prompt=prompt)
        data = JobData.submitted(request, provider="fake", model="m", tenant="default")
        return await self._take(await self.queue.enqueue(data))

    async def retake(self, handle: JobHandle) -> JobHandle:
        """Bring a deferred job back now and take it again (one more start, same attempt)."""
        assert await self.state(handle) == "delayed"
        await self.queue.bull.backend.promote(handle.id)
        return await self._take(handle.id)

    async def _take(self, job_id: str) -> JobHandle:
        token = f"test:{next(self._tokens)}"
        job = await self.worker.getNextJob(token)
        assert job is not None and str(job.id) == job_id, "one job at a time in this queue"
        return JobHandle(job, token)

    async def state(self, handle: JobHandle) -> str:
        return str(await self.queue.bull.getJobState(handle.id))

    async def delayed_until(self, handle: JobHandle) -> int | None:
        """When BullMQ will bring the job back (its delayed-set score), None when not delayed."""
        key = self.queue.bull.toKey("delayed")
        score = await self.redis.zscore(key, handle.id)
        return None if score is None else int(score) >> 12  # BullMQ: ms << 12 | counter

    async def deferred(self, action: Awaitable[object], handle: JobHandle) -> int | None:
        """Run a budget call for `handle`; the time it put the job back until, or None when it
        did not. A put-back must be real: the job is in BullMQ's delayed set until then."""
        try:
            await action
        except JobDeferred as deferred:
            assert await self.state(handle) == "delayed"
            assert await self.delayed_until(handle) == deferred.until_ms
            return deferred.until_ms
        assert await self.state(handle) == "active"
        return None

    async def aclose(self) -> None:
        await self.worker.close()
        await self.queue.close()
        await self.redis.aclose()


async def _never_run(job: Any, token: str) -> None:
    raise AssertionError("TakenJobs' worker never runs a processor")


MakeJobs = Callable[[Settings], TakenJobs]


@pytest.fixture
async def jobs(valkey: EmbeddedValkey) -> AsyncIterator[MakeJobs]:
    """`jobs(settings)`: a `TakenJobs` on that queue, closed after the test."""
    made: list[TakenJobs] = []

    def make(settings: Settings) -> TakenJobs:
        made.append(TakenJobs(settings))
        return made[-1]

    yield make
    for taken in made:
        await taken.aclose()
