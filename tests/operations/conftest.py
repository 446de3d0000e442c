"""Real `flow-api` processes run as an operator would: signals, a second instance, another
user, a taken port. Process helpers come from `tests.support.processes`; the /proc readers
here find what a process left behind."""

from __future__ import annotations

import asyncio
import signal
import subprocess
import time
from collections.abc import AsyncIterator, Iterator
from pathlib import Path

import httpx
import pytest

from flow_api.embedded import free_port
from flow_api.testing import Simulator, SimulatorConfig
from tests.support.processes import astop, children, flow_api, is_running, stop, wait_healthy

PROVIDER_KEY = "sk-test-not-a-real-key"

UP_ENV = {
    "FLOW_PROVIDER_FAKE_ENABLED": "true",
    "FLOW_PROVIDER_DEFAULT": "fake",
    "FLOW_LOCAL_ENABLED": "false",
    "FLOW_WORKER_SHUTDOWN_GRACE_S": "10",
}


def finish(process: subprocess.Popen[bytes], timeout_s: float = 30) -> tuple[int, str]:
    """Wait for the process to exit by itself; its exit code and output."""
    return stop(process, timeout_s, interrupt=False)


async def afinish(process: subprocess.Popen[bytes], timeout_s: float = 30) -> tuple[int, str]:
    return await astop(process, timeout_s, interrupt=False)


def valkey_of(up: subprocess.Popen[bytes]) -> tuple[int, int]:
    """The pid and port of the embedded valkey-server of a running `up` (its process title
    is `valkey-server 127.0.0.1:PORT`)."""
    for pid in children(up.pid):
        title = Path(f"/proc/{pid}/cmdline").read_bytes().split(b"\0")[0].decode()
        if "valkey-server" in title:
            return pid, int(title.rsplit(":", 1)[1])
    raise AssertionError("up has no valkey-server child")


async def wait_gone(pids: list[int], timeout_s: float) -> list[int]:
    """Wait up to `timeout_s` for every pid to end; those still running."""
    deadline = time.monotonic() + timeout_s
    alive = [p for p in pids if is_running(p)]
    while alive and time.monotonic() < deadline:
        await asyncio.sleep(0.02)  # /proc offers nothing to await
        alive = [p for p in alive if is_running(p)]
    return alive


class Up:
    """A `flow-api up` process on its own port and folder."""

    def __init__(self, data_dir: Path, env: dict[str, str] | None = None) -> None:
        self.data_dir = data_dir
        self.port = free_port()
        self.env = {**UP_ENV, "FLOW_API_PORT": str(self.port), **(env or {})}
        self.base = f"http://127.0.0.1:{self.port}"

    def start(self, *, new_session: bool = False) -> subprocess.Popen[bytes]:
        return flow_api(
            "up", "--data-dir", str(self.data_dir), env=self.env, new_session=new_session
        )

    async def started(self, *, new_session: bool = False) -> subprocess.Popen[bytes]:
        process = self.start(new_session=new_session)
        await wait_healthy(self.base, process, timeout_s=60)
        return process


@pytest.fixture
def up(tmp_path: Path) -> Iterator[Up]:
    yield Up(tmp_path / "data")


@pytest.fixture
async def simulator() -> AsyncIterator[Simulator]:
    sim = Simulator(SimulatorConfig())
    await sim.start()
    yield sim
    await sim.stop()


def openai_env(simulator: Simulator) -> dict[str, str]:
    """Environment that makes the OpenAI provider (against the simulator) the default."""
    return {
        "OPENAI_API_KEY": PROVIDER_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "FLOW_OPENAI_MODEL": "gpt-sim",
        "FLOW_PROVIDER_DEFAULT": "openai",
        "FLOW_PROVIDER_FAKE_ENABLED": "false",
    }


async def submit(client: httpx.AsyncClient, prompt: str) -> str:
    answer = await client.post("/api/ai/generate", json={"prompt": prompt})
    assert answer.status_code == 202, answer.text
    job_id: str = answer.json()["jobId"]
    return job_id


def send(process: subprocess.Popen[bytes], sig: signal.Signals) -> None:
    if process.poll() is None:
        process.send_signal(sig)


class Output:
    """Collects a process's output lines as they come (a reader thread), so a test can wait for
    a line while the process runs."""

    def __init__(self, process: subprocess.Popen[bytes]) -> None:
        import threading

        self.lines: list[str] = []
        self._process = process
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self._process.stdout is not None
        for raw in self._process.stdout:
            self.lines.append(raw.decode(errors="replace").rstrip("\n"))

    async def wait_for(self, text: str, timeout_s: float = 60) -> None:
        deadline = time.monotonic() + timeout_s
        while not any(text in line for line in self.lines):
            if time.monotonic() > deadline or self._process.poll() is not None:
                raise AssertionError(f"no {text!r} in:\n{self.text}")
            await asyncio.sleep(0.05)

    async def exit(self, timeout_s: float = 30) -> int:
        """The exit code, once the process has ended and its output is read."""
        try:
            code = await asyncio.to_thread(self._process.wait, timeout_s)
        except subprocess.TimeoutExpired:
            self._process.kill()
            self._process.wait()
            raise AssertionError(f"still running after {timeout_s} s:\n{self.text}") from None
        await asyncio.to_thread(self._reader.join, 5)
        return code

    @property
    def text(self) -> str:
        return "\n".join(self.lines)
