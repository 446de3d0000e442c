"""Child processes that never outlive the process that started them, and create private files.

A `flow-api up` killed with SIGKILL runs no clean-up code, so its children must notice on their
own: on Linux, `PR_SET_PDEATHSIG` has the kernel signal the child when its parent dies. Use
`Popen(..., preexec_fn=bind_to_parent(signal.SIGTERM), start_new_session=True)`; the new
session keeps a terminal's Ctrl-C (sent to the foreground process group) away from the child,
so the parent decides when it stops.
"""

from __future__ import annotations

import ctypes
import ctypes.util
import os
import signal
import sys
from collections.abc import Callable

PR_SET_PDEATHSIG = 1
PRIVATE_UMASK = 0o077


def bind_to_parent(death_signal: signal.Signals = signal.SIGTERM) -> Callable[[], None]:
    """A `preexec_fn`: the child gets `death_signal` when this process dies (Linux), and
    creates its files 0600 and folders 0700.

    Runs between fork and exec in the child: only async-signal-safe work (no imports, no
    allocation-heavy code). The death signal is tied to the *thread* that forks, so call
    `Popen` from a thread that lives as long as the child should (the event loop's).
    """
    parent = os.getpid()
    prctl = _prctl()

    def preexec() -> None:
        os.umask(PRIVATE_UMASK)
        if prctl is not None:
            prctl(PR_SET_PDEATHSIG, int(death_signal), 0, 0, 0)
        if os.getppid() != parent:  # the parent died before prctl took effect
            os._exit(1)

    return preexec


def _prctl() -> Callable[..., int] | None:
    if not sys.platform.startswith("linux"):
        return None
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c") or "libc.so.6", use_errno=True)
    except OSError:
        return None
    prctl: Callable[..., int] = libc.prctl
    return prctl
