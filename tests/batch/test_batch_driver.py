"""The batch driver survives a crash mid-enqueue: another driver resumes from the cursor, a
chunk queued twice adds no second job, and a leased batch is left to its holder."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

import pytest

from flow_api.auth.access import AccessControl
from flow_api.batch.driver import BatchDriver
from flow_api.batch.files import FilePurpose, FileStore
from flow_api.batch.output import line_job_id
from flow_api.batch.requests import BatchRequest
from flow_api.batch.store import BatchRecord, BatchStatus, BatchStore
from flow_api.embedded import EmbeddedValkey
from flow_api.providers import build_registry
from flow_api.queue import consumer
from flow_api.queue.admission import Admission
from flow_api.queue.connection import connect
from flow_api.queue.producer import JobQueue, job_queue
from flow_api.queue.store import JobStore
from flow_api.settings import BatchSettings, Settings
from tests.batch.test_batches import jsonl, line
from tests.support import WorkerFactory, make_settings

LINES = 23


@pytest.fixture
def settings(valkey: EmbeddedValkey) -> Settings:
    return make_settings(valkey.url, batch=BatchSettings(enqueue_chunk=5, sweep_s=0.1))


@dataclass
class Parts:
    queue: JobQueue
    files: FileStore
    batches: BatchStore
    args: tuple[object, ...]


@pytest.fixture
async def parts(settings: Settings) -> AsyncIterator[Parts]:
    registry = build_registry(settings)
    binary = connect(settings.redis, decode=False)
    async with job_queue(settings.redis, settings.worker) as queue:
        files = FileStore(binary, settings.redis.queue_name, 1024, 600)
        batches = BatchStore(queue, 600, reconcile_s=0.3)
        access = AccessControl(settings.auth, queue.redis, settings.redis.queue_name)
        args = (
            settings,
            queue,
            batches,
            files,
            JobStore(queue),
            registry,
            access,
            Admission(queue, settings.admission),
        )
        yield Parts(queue, files, batches, args)
    await binary.aclose()
    await registry.aclose()


class CrashingDriver(BatchDriver):
    """Dies after its second bulk add, before that chunk's cursor was written."""

    adds = 0

    async def _add(self, record: BatchRecord, chunk: list[tuple[int, BatchRequest]]) -> int:
        cursor = await super()._add(record, chunk)
        self.adds += 1
        if self.adds == 2:
            await self.batches.update(record.id, cursor=chunk[0][0])  # that write was lost
            raise RuntimeError("the API process died here")
        return cursor


async def _batch(parts: Parts) -> str:
    writer = parts.files.writer("default", "in.jsonl", FilePurpose.BATCH)
    await writer.write(jsonl([line(f"r{i}", f"q{i}", model="fake/m") for i in range(LINES)]))
    stored = await writer.close()
    record = await parts.batches.create(
        tenant="default",
        input_file_id=stored.id,
        completion_window="24h",
        metadata=None,
        key_id=None,
        tokens_per_day=0,
        window_s=86_400,
    )
    return record.id


async def test_an_enqueue_cut_short_is_resumed_without_duplicates(
    parts: Parts, start_worker: WorkerFactory
) -> None:
    batch_id = await _batch(parts)
    crashing = CrashingDriver(*parts.args)  # type: ignore[arg-type]
    with pytest.raises(RuntimeError):
        await crashing.drive(batch_id)
    record = await parts.batches.get(batch_id)
    assert (record.status, record.cursor, record.enqueued) == (BatchStatus.IN_PROGRESS, 5, False)
    assert await parts.batches.due(10) == [batch_id]  # still work for someone

    # Another process's driver takes over; no worker runs yet, so the queue can be counted.
    other = BatchDriver(*parts.args)  # type: ignore[arg-type]
    await other.drive(batch_id)
    record = await parts.batches.get(batch_id)
    assert (record.cursor, record.enqueued) == (LINES, True)
    redis, key = parts.queue.redis, parts.queue.bull.toKey
    ids = [line_job_id(batch_id, n) for n in range(LINES)]
    assert sum([await redis.exists(key(job_id)) for job_id in ids]) == LINES
    assert await redis.llen(key("fair:waiting")) == LINES  # each job held once
    assert await parts.batches.due(10) == []  # nothing to do until the lines end

    running = asyncio.create_task(other.run())
    try:
        await start_worker()
        deadline = asyncio.get_running_loop().time() + 60
        while (record := await parts.batches.get(batch_id)).status is not BatchStatus.COMPLETED:
            assert asyncio.get_running_loop().time() < deadline, record
            await asyncio.sleep(0.05)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert (record.completed, record.failed) == (LINES, 0)
    assert record.output_file_id is not None
    output = [raw async for _, raw in parts.files.lines(record.output_file_id)]
    assert len(output) == LINES


async def test_a_leased_batch_is_left_to_its_driver(parts: Parts) -> None:
    batch_id = await _batch(parts)
    assert await parts.batches.lease(batch_id, "another-process", 60_000)
    await BatchDriver(*parts.args).drive(batch_id)  # type: ignore[arg-type]
    assert (await parts.batches.get(batch_id)).status is BatchStatus.VALIDATING
    await parts.batches.release(batch_id, "another-process")
    await BatchDriver(*parts.args).drive(batch_id)  # type: ignore[arg-type]
    assert (await parts.batches.get(batch_id)).enqueued


class Forgetful:
    """A worker's tally that never counts: as when each worker dies between a job's end and
    its count."""

    def __init__(self, *_: object) -> None:
        pass

    async def settled(self, job_id: str, data: object) -> None:
        return None


async def test_lines_that_ended_without_their_tally_are_recounted(
    parts: Parts, start_worker: WorkerFactory, monkeypatch: pytest.MonkeyPatch
) -> None:
    monkeypatch.setattr(consumer, "BatchTally", Forgetful)
    await start_worker()
    batch_id = await _batch(parts)
    running = asyncio.create_task(BatchDriver(*parts.args).run())  # type: ignore[arg-type]
    try:
        deadline = asyncio.get_running_loop().time() + 60
        while (record := await parts.batches.get(batch_id)).status is not BatchStatus.COMPLETED:
            assert asyncio.get_running_loop().time() < deadline, record
            await asyncio.sleep(0.05)
    finally:
        running.cancel()
        with contextlib.suppress(asyncio.CancelledError):
            await running
    assert (record.completed, record.failed) == (LINES, 0)


class CancelledWhileValidating(BatchDriver):
    async def _validate(self, record: BatchRecord) -> bool:
        assert await self.batches.cancel(record.id, record.tenant)
        return await super()._validate(record)


async def test_a_cancel_during_validation_wins(parts: Parts) -> None:
    batch_id = await _batch(parts)
    await CancelledWhileValidating(*parts.args).drive(batch_id)  # type: ignore[arg-type]
    record = await parts.batches.get(batch_id)
    assert record.status is BatchStatus.CANCELLED
    assert (record.total, record.completed, record.failed) == (LINES, 0, LINES)
    assert record.error_file_id is not None and record.output_file_id is None
    redis, key = parts.queue.redis, parts.queue.bull.toKey
    assert not await redis.exists(key(line_job_id(batch_id, 0)))  # nothing was queued
