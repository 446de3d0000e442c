"""A stop signal that arrives before the event loop runs is acted on even if its
`KeyboardInterrupt` is lost (C code calling back into Python prints it as "Exception ignored"
and carries on: seen with pydantic building a validator during `up`'s start-up)."""

from __future__ import annotations

import asyncio
import contextlib
import os
import signal
from collections.abc import Iterator

import pytest

from flow_api.stopping import StopRequests


@pytest.fixture
def signal_handlers() -> Iterator[None]:
    kept = {sig: signal.getsignal(sig) for sig in StopRequests.SIGNALS}
    yield
    for sig, handler in kept.items():
        signal.signal(sig, handler)
    StopRequests.early.clear()


def lose_a_stop_signal(sig: signal.Signals) -> None:
    with contextlib.suppress(KeyboardInterrupt):  # what C code calling back into Python does
        os.kill(os.getpid(), sig)


@pytest.mark.usefixtures("signal_handlers")
def test_a_stop_signal_whose_interrupt_was_lost_stops_the_loop_at_once() -> None:
    StopRequests.before_loop()
    lose_a_stop_signal(signal.SIGTERM)

    async def started() -> StopRequests:
        return StopRequests.install()

    stops = asyncio.run(started())
    assert stops.first.is_set() and not stops.second.is_set()


@pytest.mark.usefixtures("signal_handlers")
def test_two_early_signals_are_a_second_request_too() -> None:
    StopRequests.before_loop()
    lose_a_stop_signal(signal.SIGTERM)
    lose_a_stop_signal(signal.SIGHUP)

    async def started() -> StopRequests:
        return StopRequests.install()

    stops = asyncio.run(started())
    assert stops.first.is_set() and stops.second.is_set()
