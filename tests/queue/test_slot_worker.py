"""The slot supervisor: a slot that ends is logged at ERROR and replaced; slots that keep dying
make the worker give up (`SlotsLost`), so its process exits non-zero. Real Valkey."""

from __future__ import annotations

import asyncio
import logging
from typing import Any

import pytest

from flow_api.queue.slot_worker import SlotsLost, SlotWorker
from flow_api.settings import Settings


def options(settings: Settings) -> dict[str, Any]:
    return {
        "connection": settings.redis.url,
        "prefix": settings.redis.prefix,
        "concurrency": 2,
        "drainDelay": 1,
    }


async def nothing(job: Any, token: str) -> None:
    return None


class DiesOnce(SlotWorker):
    """The first slot started ends at once, as a slot hit by a stray cancel would."""

    died = False

    async def _slot(self) -> None:
        if not DiesOnce.died:
            DiesOnce.died = True
            raise asyncio.CancelledError
        await super()._slot()


class AlwaysDies(SlotWorker):
    async def _slot(self) -> None:
        raise RuntimeError("this slot cannot go on")


async def test_a_slot_that_ends_is_logged_and_replaced(
    settings: Settings, caplog: pytest.LogCaptureFixture
) -> None:
    worker = DiesOnce(settings.redis.queue_name, nothing, options(settings))
    running = asyncio.create_task(worker.run())
    try:
        for _ in range(200):
            if DiesOnce.died and worker.live_slots == 2:
                break
            await asyncio.sleep(0.05)
        assert DiesOnce.died and worker.live_slots == 2
        errors = [r for r in caplog.records if r.levelno == logging.ERROR]
        assert any("slot ended unexpectedly (cancelled)" in r.getMessage() for r in errors)
    finally:
        await worker.close()
        await asyncio.wait_for(running, 15)
    assert worker.live_slots == 0


async def test_slots_that_keep_dying_stop_the_worker(settings: Settings) -> None:
    worker = AlwaysDies(settings.redis.queue_name, nothing, options(settings))
    try:
        with pytest.raises(SlotsLost, match="this slot cannot go on"):
            await asyncio.wait_for(worker.run(), 30)
    finally:
        await worker.close()
