"""`flow-api batch run` in a real terminal (a pty): the live bar, Ctrl-C, and the same command
resuming the same batch (no line runs twice); `status`, `results`, `cancel`."""

from __future__ import annotations

import asyncio
import contextlib
import os
import pty
import re
import select
import signal
import subprocess
from collections.abc import Iterator
from pathlib import Path

import orjson
import pytest

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import ProviderSettings, Settings
from flow_api.testing import Simulator
from flow_api.testing.children import env_for, flow_api_command
from tests.support import Api, WorkerFactory, make_settings, openai_on

LINES = 240
ANSI = re.compile(r"\x1b\[[0-9;?]*[A-Za-z]")


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator) -> Settings:
    return make_settings(
        valkey.url,
        provider=ProviderSettings(default="openai", fake_enabled=False),
        openai=openai_on(simulator.url),
    )


class Terminal:
    """A `flow-api` child on a pty, as in a terminal; its screen output as text."""

    def __init__(self, args: list[str], env: dict[str, str], cwd: Path) -> None:
        master, slave = pty.openpty()
        self.master = master
        self.process = subprocess.Popen(
            flow_api_command(*args),
            env={**env, "COLUMNS": "120", "TERM": "xterm"},
            stdin=slave,
            stdout=slave,
            stderr=slave,
            cwd=cwd,
            start_new_session=True,
        )
        os.close(slave)
        self.screen = ""

    def read(self) -> None:
        while select.select([self.master], [], [], 0)[0]:
            try:
                chunk = os.read(self.master, 65536)
            except OSError:  # the child closed its end
                return
            if not chunk:
                return
            self.screen += ANSI.sub("", chunk.decode(errors="replace"))

    async def wait_for(self, text: str, timeout_s: float = 30) -> None:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while text not in self.screen:
            self.read()
            assert asyncio.get_running_loop().time() < deadline, f"no {text!r} in {self.screen}"
            await asyncio.sleep(0.05)

    async def exit_code(self, timeout_s: float = 60) -> int:
        deadline = asyncio.get_running_loop().time() + timeout_s
        while (code := self.process.poll()) is None:
            self.read()
            assert asyncio.get_running_loop().time() < deadline, self.screen
            await asyncio.sleep(0.05)
        self.read()
        return code

    def close(self) -> None:
        if self.process.poll() is None:
            self.process.kill()
            self.process.wait()
        os.close(self.master)


@contextlib.contextmanager
def terminal(args: list[str], env: dict[str, str], cwd: Path) -> Iterator[Terminal]:
    term = Terminal(args, env, cwd)
    try:
        yield term
    finally:
        term.close()


async def test_run_shows_progress_survives_ctrl_c_and_resumes(
    api: Api,
    settings: Settings,
    simulator: Simulator,
    start_worker: WorkerFactory,
    tmp_path: Path,
) -> None:
    simulator.config.latency_s = 0.25
    await start_worker()
    prompts = tmp_path / "prompts.jsonl"
    lines = [
        {"custom_id": f"p{i}", "prompt": f"say {i}", "options": {"maxTokens": 8}}
        for i in range(LINES)
    ]
    lines.append({"custom_id": "bad", "prompt": "[[sim:bad:400]] no"})
    prompts.write_bytes(b"".join(orjson.dumps(item) + b"\n" for item in lines))
    env = env_for(
        settings, inherit=True, FLOW_BATCH_API_URL=f"http://127.0.0.1:{settings.api.port}"
    )
    command = ["batch", "run", "prompts.jsonl", "--out", "results.jsonl"]

    with terminal(command, env, tmp_path) as first:
        await first.wait_for("in flight")
        await first.wait_for("━")  # the bar, drawn for a terminal
        first.process.send_signal(signal.SIGINT)  # what Ctrl-C sends
        assert await first.exit_code() == 130
    assert "run the same command again to resume" in first.screen
    state = orjson.loads((tmp_path / "results.jsonl.state.json").read_bytes())
    assert not (tmp_path / "results.jsonl").exists()

    with terminal(command, env, tmp_path) as second:
        code = await second.exit_code()
    assert f"resuming batch {state['batch_id']}" in second.screen, second.screen
    assert code == 1, second.screen  # one line failed
    assert "completed: 240 completed, 1 failed" in second.screen.replace("\r\n", " ")
    results = [orjson.loads(raw) for raw in (tmp_path / "results.jsonl").read_bytes().splitlines()]
    assert [item["custom_id"] for item in results] == [f"p{i}" for i in range(LINES)] + ["bad"]
    assert results[0]["response"]["body"]["choices"][0]["message"]["content"] == "sim: say 0"
    assert results[-1]["response"]["status_code"] == 400
    assert simulator.stats.requests == LINES + 1  # no line ran twice
    assert not (tmp_path / "results.jsonl.state.json").exists()

    with terminal(["batch", "status", state["batch_id"]], env, tmp_path) as status:
        assert await status.exit_code() == 0
    assert "completed; 241 lines, 240 completed, 1 failed" in status.screen
    with terminal(["batch", "cancel", state["batch_id"]], env, tmp_path) as cancel:
        assert await cancel.exit_code() == 1
    assert "409" in cancel.screen
    out = tmp_path / "again.jsonl"
    with terminal(
        ["batch", "results", state["batch_id"], "--out", str(out)], env, tmp_path
    ) as again:
        assert await again.exit_code() == 0
    assert out.read_bytes() == (tmp_path / "results.jsonl").read_bytes()
