"""A serving command's loop ends within a bound even when a task it left will not end
(`flow_api.running`): the process exits, naming the task, with the code it would have had."""

from __future__ import annotations

import subprocess
import sys
import time

SCRIPT = """
import asyncio, logging, sys
from flow_api import running
logging.basicConfig(level=logging.INFO)

async def main(fail):
    async def stubborn():  # swallows every cancel, as a library bug might
        while True:
            try:
                await asyncio.sleep(10)
            except asyncio.CancelledError:
                pass
    asyncio.create_task(stubborn(), name="stubborn")
    await asyncio.sleep(0.05)
    if fail:
        raise RuntimeError("boom")

running.run(main(sys.argv[1] == "fail"), cleanup_s=1)
"""


def run(mode: str) -> tuple[subprocess.CompletedProcess[str], float]:
    started = time.monotonic()
    done = subprocess.run(
        [sys.executable, "-c", SCRIPT, mode], capture_output=True, text=True, timeout=30
    )
    return done, time.monotonic() - started


def test_a_task_that_ignores_its_cancel_does_not_keep_the_process_alive() -> None:
    done, took = run("ok")
    assert done.returncode == 0, done.stderr
    assert "exiting without them: task stubborn at stubborn:" in done.stderr, done.stderr
    assert took < 15, took  # 1 s of clean-up, not forever (start-up takes the rest)


def test_the_exit_code_says_the_run_failed() -> None:
    done, _ = run("fail")
    assert done.returncode == 1, done.stderr
    assert "ended by RuntimeError: boom" in done.stderr, done.stderr


def test_a_clean_end_runs_to_completion() -> None:
    done = subprocess.run(
        [
            sys.executable,
            "-c",
            "from flow_api import running\nimport asyncio\n"
            "async def main():\n    await asyncio.sleep(0)\n"
            "running.run(main())\nprint('after')",
        ],
        capture_output=True,
        text=True,
        timeout=30,
    )
    assert done.returncode == 0 and done.stdout.strip() == "after", done
