"""A serving command's event loop, ended within a bound.

`uvloop.run` (like `asyncio.run`) ends by cancelling every task left and waiting for all of
them, then for the default executor's threads, with no limit. One task that does not end when
cancelled, or one thread stuck in a call, then keeps a process that has finished its work (and
said "worker stopped") alive until it is killed: seen once in the interleaving soak, a worker
SIGTERMed and drained that had not exited 20 s later. Here the leftovers get `cleanup_s`; what
is still running then is logged (each task with its chain of awaits, each thread by name) and
the process exits at once, with the code it would have had.
"""

from __future__ import annotations

import asyncio
import logging
import os
import sys
import threading
from collections.abc import Coroutine
from typing import Any, NoReturn

import uvloop

log = logging.getLogger(__name__)

CLEANUP_S = 5.0


def run(main: Coroutine[Any, Any, None], cleanup_s: float = CLEANUP_S) -> None:
    """Run `main` to its end on a new uvloop loop, then end what it left within `cleanup_s`.
    Raises what `main` raised (after the clean-up)."""
    loop = uvloop.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        loop.run_until_complete(main)
    finally:
        stuck = _finish(loop, cleanup_s)
        if stuck:
            error = sys.exc_info()[1]
            if error is not None:
                log.error("ended by %s: %s", type(error).__name__, error)
            _exit_now(stuck, 0 if error is None else 1)
        loop.close()
        asyncio.set_event_loop(None)


def _finish(loop: asyncio.AbstractEventLoop, cleanup_s: float) -> list[str]:
    """Cancel the tasks left and close the executor, each within `cleanup_s`; what did not end."""
    tasks = [task for task in asyncio.all_tasks(loop) if not task.done()]
    for task in tasks:
        task.cancel()
    if tasks:
        loop.run_until_complete(asyncio.wait(tasks, timeout=cleanup_s))
    stuck = [f"task {t.get_name()} at {awaiting(t)}" for t in tasks if not t.done()]
    for task in tasks:
        if task.done() and not task.cancelled() and task.exception() is not None:
            log.debug("task %s ended with %r", task.get_name(), task.exception())
    loop.run_until_complete(loop.shutdown_asyncgens())
    try:
        loop.run_until_complete(asyncio.wait_for(loop.shutdown_default_executor(), cleanup_s))
    except TimeoutError:
        busy = [t.name for t in threading.enumerate() if t.name.startswith("asyncio_")]
        stuck += [f"thread {name} (in a to_thread call)" for name in busy] or ["the executor"]
    return stuck


def awaiting(task: asyncio.Task[Any]) -> str:
    """Where a task waits, outermost first: its coroutine's chain of awaits."""
    where: list[str] = []
    coro: Any = task.get_coro()
    while coro is not None:
        frame = getattr(coro, "cr_frame", None) or getattr(coro, "gi_frame", None)
        if frame is not None:
            where.append(f"{frame.f_code.co_name}:{frame.f_lineno}")
        coro = getattr(coro, "cr_await", None) or getattr(coro, "gi_yieldfrom", None)
    return " -> ".join(where) or repr(task)


def _exit_now(stuck: list[str], code: int) -> NoReturn:
    log.warning(
        "still running %.0f s after the end, so exiting without them: %s",
        CLEANUP_S,
        "; ".join(stuck),
    )
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)
