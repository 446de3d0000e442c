"""Start, signal and stop real `flow-api` processes in tests."""

from __future__ import annotations

import asyncio
import os
import signal
import subprocess
from pathlib import Path

import httpx

from flow_api.queue.connection import connect
from flow_api.settings import Settings
from flow_api.testing.children import env_for, flow_api_command

__all__ = [
    "astop",
    "children",
    "env_for",
    "flow_api",
    "is_running",
    "stop",
    "wait_for_workers",
    "wait_healthy",
]


def flow_api(*args: str, env: dict[str, str], new_session: bool = False) -> subprocess.Popen[bytes]:
    """`flow-api ARGS` as a child process, this environment updated with `env` (see
    `env_for`); stdout and stderr together. `new_session` makes it lead a process group, as a
    shell does for a foreground job (so a test can send the terminal's Ctrl-C to the group)."""
    return subprocess.Popen(
        flow_api_command(*args),
        env={**os.environ, **env},
        stdout=subprocess.PIPE,
        stderr=subprocess.STDOUT,
        start_new_session=new_session,
    )


def stop(
    process: subprocess.Popen[bytes], timeout_s: float = 20, *, interrupt: bool = True
) -> tuple[int, str]:
    """SIGINT (if `interrupt` and still running), then its exit code and output."""
    if interrupt and process.poll() is None:
        process.send_signal(signal.SIGINT)
    try:
        output, _ = process.communicate(timeout=timeout_s)
    except subprocess.TimeoutExpired:
        process.kill()
        output, _ = process.communicate()
        raise AssertionError(f"process did not stop in {timeout_s} s:\n{output.decode()}") from None
    return process.returncode, output.decode()


async def astop(
    process: subprocess.Popen[bytes], timeout_s: float = 20, *, interrupt: bool = True
) -> tuple[int, str]:
    """`stop` without blocking the event loop (the simulator and API may live on it)."""
    return await asyncio.to_thread(stop, process, timeout_s, interrupt=interrupt)


async def wait_healthy(base: str, process: subprocess.Popen[bytes], timeout_s: float = 30) -> None:
    """Wait until the API at `base` answers `/healthz` (failing if `process` exits first)."""
    deadline = asyncio.get_running_loop().time() + timeout_s
    async with httpx.AsyncClient(base_url=base) as client:
        while asyncio.get_running_loop().time() < deadline:
            assert process.poll() is None, process.stdout.read().decode()  # type: ignore[union-attr]
            try:
                if (await client.get("/healthz")).status_code == 200:
                    return
            except httpx.TransportError:
                pass
            await asyncio.sleep(0.1)
    raise AssertionError("service did not become healthy")


async def wait_for_workers(settings: Settings, count: int, timeout_s: float = 30) -> None:
    """Wait until `count` worker processes are up and idle on the queue: each blocks one
    connection, named after the queue, in BullMQ's BZPOPMIN. Tests that need every process to
    take part wait for this: a fast worker can otherwise drain a batch before another starts."""
    name = f"{settings.redis.prefix}:{settings.redis.queue_name}"
    client = connect(settings.redis)
    try:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while True:
            clients = await client.client_list()
            idle = sum(1 for c in clients if c.get("name") == name and c.get("cmd") == "bzpopmin")
            if idle >= count:
                return
            assert asyncio.get_running_loop().time() < deadline, f"{idle} of {count} workers up"
            await asyncio.sleep(0.1)
    finally:
        await client.aclose()


def is_running(pid: int) -> bool:
    """True unless the process is gone or a zombie (dead, waiting to be reaped)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return stat.rsplit(")", 1)[1].split()[0] != "Z"


def children(pid: int) -> list[int]:
    """The live child processes of `pid`."""
    found = []
    for entry in Path("/proc").iterdir():
        if not entry.name.isdigit():
            continue
        try:
            stat = (entry / "stat").read_text()
        except OSError:
            continue
        fields = stat.rsplit(")", 1)[1].split()
        if int(fields[1]) == pid and fields[0] != "Z":
            found.append(int(entry.name))
    return found
