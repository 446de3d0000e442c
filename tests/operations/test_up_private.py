"""`flow-api up` on a shared machine (issue 23 items 1-2): another local user can neither read
the data nor talk to the embedded Valkey, and one folder serves one `up` at a time."""

from __future__ import annotations

import asyncio
import signal
import stat
import subprocess
import tempfile
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from tests.operations.conftest import Up, afinish, send, submit, valkey_of

NOBODY = ["setpriv", "--reuid=65534", "--regid=65534", "--clear-groups"]

# Run as uid 65534 with the system interpreter (stdlib only): what any local account can do.
PROBE = r"""
import pathlib, socket, sys
folder, port = pathlib.Path(sys.argv[1]), int(sys.argv[2])
denied = 0
for path in (folder, folder / "appendonlydir"):
    try:
        found = [p.read_bytes() for p in path.iterdir() if p.is_file()]
        print("read", path, sum(b"SECRET-PROMPT" in data for data in found))
    except PermissionError:
        denied += 1
for name in ("valkey.password", "appendonlydir/appendonly.aof.1.incr.aof"):
    try:
        (folder / name).read_bytes()
        print("read", name)
    except PermissionError:
        denied += 1
print("read denied" if denied == 4 else "read allowed")
with socket.create_connection(("127.0.0.1", port), timeout=5) as sock:
    sock.sendall(b"KEYS *\r\nSET flow:forged 1\r\n")
    sock.settimeout(2)
    replies = b""
    while replies.count(b"\r\n") < 2:
        chunk = sock.recv(4096)
        if not chunk:
            break
        replies += chunk
print("valkey", replies.decode(errors="replace").replace("\r\n", "|"))
"""


@pytest.fixture
def shared_parent() -> Iterator[Path]:
    """A folder every user may enter (pytest's tmp_path is private to root), as a home or
    project folder usually is."""
    with tempfile.TemporaryDirectory(prefix="flow-shared-") as folder:
        Path(folder).chmod(0o755)
        yield Path(folder)


async def test_another_user_can_neither_read_prompts_nor_use_valkey(
    shared_parent: Path,
) -> None:
    up = Up(shared_parent / "data")
    process = await up.started()
    try:
        async with httpx.AsyncClient(base_url=up.base) as client:
            await submit(client, "SECRET-PROMPT of the owner")
        _, port = valkey_of(process)
        probe = await asyncio.to_thread(
            subprocess.run,
            [*NOBODY, "/usr/bin/python3", "-c", PROBE, str(up.data_dir), str(port)],
            capture_output=True,
            text=True,
            timeout=30,
            check=False,
        )
    finally:
        send(process, signal.SIGINT)
        code, output = await afinish(process)
    assert code == 0, output
    assert probe.returncode == 0, probe.stderr
    lines = probe.stdout.splitlines()
    assert lines[0] == "read denied", probe.stdout
    assert lines[1].startswith("valkey -NOAUTH"), probe.stdout
    assert lines[1].count("-NOAUTH") == 2, probe.stdout  # neither read nor write

    assert stat.S_IMODE(up.data_dir.stat().st_mode) == 0o700
    for path in up.data_dir.rglob("*"):
        expected = 0o700 if path.is_dir() else 0o600
        assert stat.S_IMODE(path.stat().st_mode) == expected, path
    password = (up.data_dir / "valkey.password").read_text().strip()
    assert len(password) >= 32
    assert password not in output, "the password must never be printed"


async def test_an_older_world_readable_folder_is_made_private(shared_parent: Path) -> None:
    data = shared_parent / "data"
    (data / "appendonlydir").mkdir(parents=True, mode=0o755)
    data.chmod(0o755)
    old = data / "appendonlydir" / "note.txt"
    old.write_text("readable")
    old.chmod(0o644)
    up = Up(data)
    process = await up.started()
    send(process, signal.SIGINT)
    code, output = await afinish(process)
    assert code == 0, output
    assert stat.S_IMODE(data.stat().st_mode) == 0o700
    assert stat.S_IMODE(old.stat().st_mode) == 0o600


async def test_a_second_up_on_the_same_folder_names_the_holder_and_exits(up: Up) -> None:
    first = await up.started()
    try:
        second = Up(up.data_dir)  # its own port: only the folder is shared
        code, output = await afinish(second.start(), timeout_s=30)
        assert code == 1, output
        assert f"pid {first.pid}" in output and str(up.data_dir) in output, output
        assert "Traceback" not in output
        # The first one is untouched and still serves.
        async with httpx.AsyncClient(base_url=up.base) as client:
            assert (await client.get("/readyz")).status_code == 200
    finally:
        send(first, signal.SIGINT)
        code, output = await afinish(first)
    assert code == 0, output
    # Released on exit: the folder can be used again.
    again = await up.started()
    send(again, signal.SIGINT)
    assert (await afinish(again))[0] == 0
