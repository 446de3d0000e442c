"""The folder `flow-api up` keeps its data in: private to its owner, used by one `up` at a time.

- **Private.** The folder is 0700 and what is written in it 0600, so another local user can read
  neither prompts out of the append-only files nor the password of the embedded Valkey.
- **One owner.** An exclusive `flock` on `flow-api.lock` (which holds the owner's pid). The
  kernel drops it when the holder dies, however it dies, so a crash never leaves a stale lock;
  the embedded Valkey inherits the lock's descriptor, so the folder stays locked until it has
  exited too (two servers on one append-only file lose jobs).
- **A password per folder.** Made once with `secrets`, kept in `valkey.password` (0600); the
  embedded Valkey requires it and the URL the API and worker use carries it.
"""

from __future__ import annotations

import contextlib
import errno
import fcntl
import os
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

from flow_api.startup import StartupError

LOCK_FILE = "flow-api.lock"
PASSWORD_FILE = "valkey.password"
PRIVATE_DIR = 0o700
PRIVATE_FILE = 0o600


class DataFolderError(StartupError):
    """The data folder cannot be used; the message is one line saying why and what to do."""


class DataFolderLocked(DataFolderError):
    """Another `flow-api up` (or its Valkey) is using the folder."""

    def __init__(self, path: Path, holder: str) -> None:
        super().__init__(
            f"data folder {path} is in use by another flow-api up (pid {holder}); stop it "
            "first, or give this one its own folder with --data-dir"
        )
        self.holder = holder


@dataclass(frozen=True)
class DataFolder:
    """A claimed data folder: its path, the lock's descriptor and the Valkey password."""

    path: Path
    lock_fd: int
    password: str


@contextlib.contextmanager
def claim(path: Path) -> Iterator[DataFolder]:
    """Create (0700) and lock `path` for this process; raise `DataFolderError` when it cannot
    be used. The lock is released on exit (and by the kernel if the process dies)."""
    path = path.resolve()
    with _unusable_as_error(path):
        path.mkdir(mode=PRIVATE_DIR, parents=True, exist_ok=True)
        os.chmod(path, PRIVATE_DIR)  # an older folder may have been created 0755
        fd = os.open(path / LOCK_FILE, os.O_RDWR | os.O_CREAT | os.O_CLOEXEC, PRIVATE_FILE)
    try:
        _lock(fd, path)
        with _unusable_as_error(path):
            os.ftruncate(fd, 0)
            os.write(fd, f"{os.getpid()}\n".encode())
            _private_files(path)
            password = _password(path)
        yield DataFolder(path, fd, password)
    finally:
        os.close(fd)


def _lock(fd: int, path: Path) -> None:
    try:
        fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
    except BlockingIOError:
        holder = os.pread(fd, 32, 0).decode(errors="replace").strip() or "unknown"
        raise DataFolderLocked(path, holder) from None


def _password(path: Path) -> str:
    """The folder's Valkey password, made on first use; never logged or printed."""
    file = path / PASSWORD_FILE
    with contextlib.suppress(FileNotFoundError):
        existing = file.read_text().strip()
        if existing:
            return existing
    password = secrets.token_urlsafe(32)  # URL-safe: goes into redis://:PASSWORD@host
    fd = os.open(file, os.O_WRONLY | os.O_CREAT | os.O_TRUNC | os.O_CLOEXEC, PRIVATE_FILE)
    with os.fdopen(fd, "w") as out:
        out.write(password + "\n")
    return password


def _private_files(path: Path) -> None:
    """Files an older version left readable to others (AOF, logs) become 0600, folders 0700."""
    for root, dirs, files in os.walk(path):
        for name in dirs:
            os.chmod(Path(root) / name, PRIVATE_DIR)
        for name in files:
            os.chmod(Path(root) / name, PRIVATE_FILE)


@contextlib.contextmanager
def _unusable_as_error(path: Path) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        reason = exc.strerror or errno.errorcode.get(exc.errno or 0, str(exc))
        raise DataFolderError(
            f"cannot use data folder {path}: {reason}; choose a folder this user can write "
            "with --data-dir"
        ) from None
