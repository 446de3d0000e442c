"""Shared pieces of the benchmark scripts: servers, child processes, CPU/RSS meters, tables.

Everything binds to loopback. Timings are printed as figures and ratios, never asserted: this
machine is small and shared, so only numbers measured side by side in one run compare.
"""

from __future__ import annotations

import contextlib
import datetime
import os
import platform
import queue
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path

import psutil
from redis.asyncio import Redis

from flow_api.embedded import EmbeddedValkey
from flow_api.testing import SimulatorProcess

PROVIDER_KEY = "sk-bench-not-a-real-key"
SIM_MODEL = "gpt-sim"


def machine() -> str:
    """One line saying where the figures come from."""
    cpu = "unknown CPU"
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                cpu = line.split(":", 1)[1].strip()
                break
    load = ", ".join(f"{x:.1f}" for x in os.getloadavg())
    today = datetime.date.today().isoformat()
    return (
        f"{today}; {cpu}, {psutil.cpu_count()} cores, "
        f"{psutil.virtual_memory().total / 2**30:.0f} GiB; Python {platform.python_version()}; "
        f"load average before the run {load}"
    )


@contextlib.contextmanager
def valkey_server() -> Iterator[EmbeddedValkey]:
    """A throwaway valkey-server (append-only persistence on, as in production)."""
    with tempfile.TemporaryDirectory(prefix="flow-bench-") as folder:
        server = EmbeddedValkey(Path(folder))
        server.start()
        try:
            yield server
        finally:
            server.stop()


@contextlib.contextmanager
def simulator(*args: str) -> Iterator[SimulatorProcess]:
    """The provider simulator in its own process (so its CPU is not the measured process's)."""
    sim = SimulatorProcess(*args)
    sim.start()
    try:
        yield sim
    finally:
        sim.stop()


def worker_env(redis_url: str, queue_name: str, sim_url: str, **extra: str) -> dict[str, str]:
    """The environment of a `flow-api worker` on the simulator (OpenAI provider only)."""
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "OPENAI_"))}
    env.update(
        FLOW_REDIS_URL=redis_url,
        FLOW_REDIS_QUEUE_NAME=queue_name,
        OPENAI_API_KEY=PROVIDER_KEY,
        OPENAI_BASE_URL=f"{sim_url}/v1",
        FLOW_OPENAI_MODEL=SIM_MODEL,
        FLOW_LOCAL_ENABLED="false",
        FLOW_PROVIDER_DEFAULT="openai",
        FLOW_LOG_LEVEL="INFO",
        FLOW_WORKER_SHUTDOWN_GRACE_S="5",
    )
    env.update(extra)
    return env


class Child:
    """A child process whose output lines are collected by a thread, so pipes never fill."""

    def __init__(self, command: Sequence[str], env: dict[str, str] | None = None) -> None:
        self.command = list(command)
        self.process = subprocess.Popen(
            self.command,
            env=env,
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            stderr=subprocess.STDOUT,
            text=True,
            bufsize=1,
        )
        self.lines: queue.SimpleQueue[str] = queue.SimpleQueue()
        self.output: list[str] = []
        self._reader = threading.Thread(target=self._read, daemon=True)
        self._reader.start()

    def _read(self) -> None:
        assert self.process.stdout is not None
        for line in self.process.stdout:
            self.output.append(line)
            self.lines.put(line)

    @property
    def pid(self) -> int:
        return self.process.pid

    def wait_for(self, text: str, timeout_s: float = 60) -> str:
        """The first output line containing `text`; raises if the child dies or is silent."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            try:
                line = self.lines.get(timeout=0.2)
            except queue.Empty:
                if self.process.poll() is not None:
                    break
                continue
            if text in line:
                return line
        raise RuntimeError(
            f"{self.command[:4]} never said {text!r}; output:\n{''.join(self.output)[-3000:]}"
        )

    def send(self, line: str) -> None:
        assert self.process.stdin is not None
        self.process.stdin.write(line + "\n")
        self.process.stdin.flush()

    def stop(self, timeout_s: float = 30) -> int:
        """SIGTERM, then SIGKILL after `timeout_s`; returns the exit code."""
        if self.process.poll() is None:
            self.process.terminate()
        try:
            code = self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            code = self.process.wait()
        self._reader.join(5)
        return code


def python_child(script: str, *args: str, env: dict[str, str] | None = None) -> Child:
    return Child([sys.executable, script, *args], env=env)


@dataclass
class Meter:
    """CPU seconds and peak RSS of some processes over a window (sampled every 0.1 s)."""

    pids: list[int]
    cpu_start: float = 0.0
    cpu_end: float = 0.0
    peak_rss: int = 0
    _stop: threading.Event = field(default_factory=threading.Event)
    _thread: threading.Thread | None = None

    def _cpu(self) -> float:
        total = 0.0
        for pid in self.pids:
            times = psutil.Process(pid).cpu_times()
            total += times.user + times.system
        return total

    def _rss(self) -> int:
        return sum(psutil.Process(pid).memory_info().rss for pid in self.pids)

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            with contextlib.suppress(psutil.Error):
                self.peak_rss = max(self.peak_rss, self._rss())

    def start(self) -> None:
        self.cpu_start = self._cpu()
        self.peak_rss = self._rss()
        self._thread = threading.Thread(target=self._sample, daemon=True)
        self._thread.start()

    def stop(self) -> None:
        self.cpu_end = self._cpu()
        self._stop.set()
        if self._thread is not None:
            self._thread.join()

    @property
    def cpu_s(self) -> float:
        return self.cpu_end - self.cpu_start


class Profiler:
    """`py-spy record` on some processes while a scenario runs (collapsed stacks, one file each).

    Only when asked (`--py-spy DIR`): py-spy is not a dependency of the project.
    """

    def __init__(self, pids: Sequence[int], folder: Path | None, name: str) -> None:
        self.pids = list(pids)
        self.folder = folder
        self.name = name
        self._children: list[subprocess.Popen[bytes]] = []

    def start(self) -> None:
        if self.folder is None:
            return
        self.folder.mkdir(parents=True, exist_ok=True)
        slug = "".join(ch if ch.isalnum() else "-" for ch in self.name).strip("-")
        for pid in self.pids:
            out = self.folder / f"{slug}-{pid}.txt"
            command = ["py-spy", "record", "-p", str(pid), "-f", "raw", "-r", "100", "-o", str(out)]
            self._children.append(
                subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
            )

    def stop(self) -> None:
        for child in self._children:
            child.send_signal(signal.SIGINT)  # py-spy writes its file on SIGINT
        for child in self._children:
            try:
                child.wait(30)
            except subprocess.TimeoutExpired:
                child.kill()
                child.wait()


def table(header: Sequence[str], rows: Sequence[Sequence[object]]) -> str:
    """A Markdown table (it reads as plain text too)."""
    cells = [[str(c) for c in header], *[[str(c) for c in row] for row in rows]]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]

    def line(row: Sequence[str]) -> str:
        return "| " + " | ".join(c.ljust(w) for c, w in zip(row, widths, strict=True)) + " |"

    rule = "|" + "|".join("-" * (w + 2) for w in widths) + "|"
    return "\n".join([line(cells[0]), rule, *(line(r) for r in cells[1:])])


def ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


async def finished(redis: Redis, queue_name: str, prefix: str = "bull") -> tuple[int, int]:
    """(completed, failed) jobs in a BullMQ queue, as its two sets count them."""
    completed = await redis.zcard(f"{prefix}:{queue_name}:completed")
    failed = await redis.zcard(f"{prefix}:{queue_name}:failed")
    return int(completed), int(failed)
