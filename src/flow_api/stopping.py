"""Stop signals: SIGINT, SIGTERM and SIGHUP, before the event loop runs and while it does.

Before the loop, a stop signal ends start-up as Ctrl-C does (`KeyboardInterrupt`, which the CLI
turns into a clean exit). That exception can be lost: raised while C code calls back into
Python (pydantic building a validator, for one), it is printed as "Exception ignored" and
start-up carries on, and the process then served until killed. So the signal is also
remembered, and the loop's handlers, once installed, act on it at once.
"""

from __future__ import annotations

import asyncio
import logging
import signal
from types import FrameType
from typing import ClassVar

log = logging.getLogger(__name__)


class StopRequests:
    """SIGINT, SIGTERM and SIGHUP (a closed terminal) as events, like a daemon treats them: the
    first asks for a graceful stop, a second one to stop waiting for in-flight jobs."""

    SIGNALS = (signal.SIGINT, signal.SIGTERM, signal.SIGHUP)
    early: ClassVar[list[signal.Signals]] = []
    """Stop signals received before the loop's handlers were installed."""

    def __init__(self) -> None:
        self.first = asyncio.Event()
        self.second = asyncio.Event()

    @classmethod
    def before_loop(cls) -> None:
        """Until `install`, a stop signal raises `KeyboardInterrupt` and is remembered."""
        for sig in cls.SIGNALS:
            signal.signal(sig, cls._early_stop)

    @classmethod
    def _early_stop(cls, signum: int, _: FrameType | None) -> None:
        cls.early.append(signal.Signals(signum))
        raise KeyboardInterrupt

    @classmethod
    def install(cls) -> StopRequests:
        """Route the stop signals to a new `StopRequests` (call first thing in the loop); one
        received before (its `KeyboardInterrupt` lost in C code) is a request already."""
        stops = cls()
        loop = asyncio.get_running_loop()
        for sig in cls.SIGNALS:
            loop.add_signal_handler(sig, stops.request, sig)
        for sig in cls.early[:2]:
            stops.request(sig)
        return stops

    def request(self, sig: signal.Signals | None = None) -> None:
        name = sig.name if sig is not None else "a stop request"
        if not self.first.is_set():
            log.info("%s: stopping (in-flight jobs get the grace period)", name)
            self.first.set()
        elif not self.second.is_set():
            log.warning("%s again: handing in-flight jobs back to the queue now", name)
            self.second.set()
