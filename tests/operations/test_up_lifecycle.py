"""`flow-api up` never hangs and never leaves a process behind (issue 11 item 3, issue 23
items 3-4): a taken port, an unusable folder, SIGKILL, SIGHUP, a signal during start-up,
a terminal's Ctrl-C with jobs in flight; and it honours FLOW_REDIS_APPENDFSYNC."""

from __future__ import annotations

import asyncio
import os
import signal
import socket
import time
from pathlib import Path

import httpx
import pytest
from redis.asyncio import Redis

from flow_api.testing import Simulator
from tests.operations.conftest import (
    Up,
    afinish,
    children,
    is_running,
    openai_env,
    send,
    submit,
    valkey_of,
    wait_gone,
)


async def test_a_taken_port_ends_up_at_once_naming_the_port_and_variable(up: Up) -> None:
    with socket.create_server(("127.0.0.1", up.port)):
        began = time.monotonic()
        process = up.start()
        code, output = await afinish(process, timeout_s=30)
        elapsed = time.monotonic() - began
    assert code == 1, output
    assert f"127.0.0.1:{up.port}" in output and "FLOW_API_PORT" in output
    assert "Traceback" not in output
    assert len(output.strip().splitlines()) == 1, output
    # The bound, from launch (interpreter start included) to exit.
    assert elapsed < 2.0, f"took {elapsed:.2f} s"
    assert not (up.data_dir / "appendonlydir").exists(), "nothing should have started"


@pytest.mark.parametrize("where", ["file/data", "file", "/proc/flow-data"])
async def test_an_unusable_data_folder_is_one_line_and_an_exit_code(
    tmp_path: Path, where: str
) -> None:
    (tmp_path / "file").write_text("")
    up = Up(tmp_path / where)
    code, output = await afinish(up.start())
    assert code == 1, output
    assert "Traceback" not in output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("flow-api: cannot use data folder"), output
    assert "--data-dir" in lines[0]


async def test_sigkill_of_up_leaves_no_process_behind(up: Up) -> None:
    process = await up.started()
    family = children(process.pid)
    valkey_pid, _ = valkey_of(process)
    assert valkey_pid in family
    process.send_signal(signal.SIGKILL)
    process.wait(10)
    survivors = await wait_gone(family, timeout_s=2.0)
    assert survivors == [], f"still running 2 s after SIGKILL of up: {survivors}"
    # The kernel released the folder's lock with the last holder: a new `up` starts at once.
    again = await up.started()
    send(again, signal.SIGINT)
    code, output = await afinish(again)
    assert code == 0, output


@pytest.mark.parametrize("sig", [signal.SIGHUP, signal.SIGTERM])
async def test_sighup_and_sigterm_stop_up_cleanly_with_valkey_last(
    up: Up, sig: signal.Signals
) -> None:
    process = await up.started()
    valkey_pid, _ = valkey_of(process)
    process.send_signal(sig)
    code, output = await afinish(process)
    assert code == 0, output
    assert not is_running(valkey_pid), "valkey outlived up"
    assert output.rstrip().endswith("stopped"), output


@pytest.mark.parametrize("delay_s", [0.3, 0.8, 1.3, 1.35, 1.8, 2.5])
async def test_a_signal_at_any_moment_of_start_up_leaves_no_orphan(up: Up, delay_s: float) -> None:
    process = up.start()
    seen: set[int] = set()
    deadline = time.monotonic() + delay_s
    while time.monotonic() < deadline:  # note every child that ever appears
        seen.update(children(process.pid))
        await asyncio.sleep(0.01)
    process.send_signal(signal.SIGTERM)
    seen.update(children(process.pid))
    code, output = await afinish(process)
    # Killed by the signal itself before the interpreter ran our code (nothing started yet),
    # or a clean stop.
    assert code in (0, -signal.SIGTERM), output
    assert await wait_gone(sorted(seen), timeout_s=2.0) == [], output
    assert "Traceback" not in output


async def test_up_honours_appendfsync_always(up: Up) -> None:
    up.env["FLOW_REDIS_APPENDFSYNC"] = "always"
    process = await up.started()
    try:
        _, port = valkey_of(process)
        password = (up.data_dir / "valkey.password").read_text().strip()
        client = Redis(port=port, password=password, decode_responses=True)
        try:
            assert await client.config_get("appendfsync") == {"appendfsync": "always"}
        finally:
            await client.aclose()
    finally:
        send(process, signal.SIGINT)
        code, output = await afinish(process)
    assert code == 0, output


async def test_ctrl_c_in_the_terminal_drains_jobs_before_valkey_stops(
    up: Up, simulator: Simulator
) -> None:
    simulator.config.latency_s = 3.0
    up.env.update(openai_env(simulator))
    # A shell runs a foreground job as its own process group; Ctrl-C signals the whole group.
    process = await up.started(new_session=True)
    async with httpx.AsyncClient(base_url=up.base) as client:
        ids = [await submit(client, f"in flight {i}") for i in range(3)]
        deadline = time.monotonic() + 30
        while simulator.stats.in_flight < 3:
            assert time.monotonic() < deadline, "jobs did not start"
            await asyncio.sleep(0.05)
    os.killpg(process.pid, signal.SIGINT)
    code, output = await afinish(process)
    assert code == 0, output

    again = await up.started()
    try:
        async with httpx.AsyncClient(base_url=up.base) as client:
            states = [(await client.get(f"/api/ai/status/{i}")).json()["status"] for i in ids]
    finally:
        send(again, signal.SIGINT)
        await afinish(again)
    assert states == ["completed"] * 3, output
