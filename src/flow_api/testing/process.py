"""The simulator in a child process, for benchmarks and multi-process tests."""

from __future__ import annotations

import select
import subprocess
import sys
import urllib.request
from types import TracebackType
from typing import Any

import orjson

READY_PREFIX = "listening on "


class SimulatorProcess:
    """`python -m flow_api.testing.simulator ARGS` (for example `"--latency", "1"`).

    `start()` waits for the ready line; `stop()` sends SIGTERM and waits. Blocking calls: use it
    from fixtures or scripts, and read counters from async code at `{url}/_sim/stats`.
    """

    def __init__(self, *args: str) -> None:
        self.args = args
        self.url = ""
        self._process: subprocess.Popen[str] | None = None

    @property
    def base_url(self) -> str:
        """The OpenAI SDK's `base_url`."""
        return f"{self.url}/v1"

    @property
    def anthropic_url(self) -> str:
        """The Anthropic SDK's `base_url`."""
        return self.url

    def start(self, timeout_s: float = 15.0) -> str:
        """Launch the process and return its root URL once it listens."""
        command = [sys.executable, "-m", "flow_api.testing.simulator", "--port", "0", *self.args]
        process = subprocess.Popen(command, stdout=subprocess.PIPE, text=True)
        self._process = process
        assert process.stdout is not None
        ready, _, _ = select.select([process.stdout], [], [], timeout_s)
        line = process.stdout.readline() if ready else ""
        if not line.startswith(READY_PREFIX):
            self.stop()
            raise RuntimeError(f"the simulator did not start (said {line!r})")
        self.url = line[len(READY_PREFIX) :].strip()
        return self.url

    def stop(self, timeout_s: float = 10.0) -> int | None:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        process, self._process = self._process, None
        if process is None:
            return None
        process.terminate()
        try:
            code = process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            process.kill()
            code = process.wait()
        if process.stdout is not None:
            process.stdout.close()
        return code

    def stats(self) -> dict[str, Any]:
        """The counters (`GET /_sim/stats`)."""
        with urllib.request.urlopen(f"{self.url}/_sim/stats", timeout=10) as answer:
            data: dict[str, Any] = orjson.loads(answer.read())
        return data

    def reset(self) -> None:
        """`POST /_sim/reset`."""
        request = urllib.request.Request(f"{self.url}/_sim/reset", data=b"", method="POST")
        with urllib.request.urlopen(request, timeout=10):
            pass

    def __enter__(self) -> SimulatorProcess:
        self.start()
        return self

    def __exit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        self.stop()
