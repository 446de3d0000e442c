"""Supervised model processes: the worker's side of local inference.

A `ModelPool` runs `LocalSettings.instances` `ModelProcess`es (see `local_process.py`), each
serving one call at a time; calls queue in the pool until a process is free. Each process has a
supervisor thread that starts the child, hands it calls, relays its tokens and answers, and
notices its death:

- a death while generating fails that call only, with the retryable `LocalModelCrashed` naming
  the signal; the child is started again after a short backoff;
- a death before the start-up self-test answered counts towards `START_FAILURE_LIMIT`; at the
  limit (three in a row by default) the pool gives up: it fails the waiting calls and every later
  one with `LocalModelUnavailable`, which names the command that installs a working build;
- a `fatal` message (no model file, not a GGUF) fails the waiting calls with that error, and the
  next call tries again.

Threads, not the event loop, own the pipes, so the pool serves any number of event loops and
synchronous callers alike; `complete` bridges with `asyncio.wrap_future`.
"""

from __future__ import annotations

import asyncio
import contextlib
import importlib.metadata
import itertools
import logging
import os
import signal
import subprocess
import sys
import threading
from collections import deque
from collections.abc import Callable
from concurrent.futures import Future
from dataclasses import dataclass
from typing import IO, Literal

from flow_api.errors import (
    LocalModelCrashed,
    LocalModelUnavailable,
    ProviderError,
    ProviderUnavailable,
)
from flow_api.providers import local_protocol as protocol
from flow_api.providers.local_model import Completion, CompletionRequest
from flow_api.providers.local_process import PARENT_ENV
from flow_api.settings import LocalSettings

log = logging.getLogger(__name__)

START_FAILURE_LIMIT = 3
BACKOFF_BASE_S = 0.25
BACKOFF_MAX_S = 8.0
STOP_GRACE_S = 2.0
# The build every install path uses (scripts/install.sh, the Dockerfile): no -march=native, so
# none of the AVX-512/AMX code paths that crash on CPUs (or VMs) that report but do not allow
# them. The flags only apply on x86-64; arm64 builds ignore them.
MODULE = "flow_api.providers.local_process"
PORTABLE_CMAKE_ARGS = "-DGGML_NATIVE=OFF -DGGML_AVX2=ON -DGGML_FMA=ON -DGGML_F16C=ON"

State = Literal["idle", "starting", "ready", "unavailable"]


def remedy() -> str:
    """The exact command that replaces the installed llama.cpp with the portable build."""
    try:
        pin = f"=={importlib.metadata.version('llama-cpp-python')}"
    except importlib.metadata.PackageNotFoundError:
        pin = ""
    return (
        f'CMAKE_ARGS="{PORTABLE_CMAKE_ARGS}" pip install --force-reinstall --no-deps '
        f'--no-cache-dir --no-binary llama-cpp-python "llama-cpp-python{pin}"'
    )


def describe_exit(returncode: int) -> tuple[str, str | None]:
    """How a child ended, and the signal's name if a signal ended it."""
    if returncode >= 0:
        return f"exited with status {returncode}", None
    try:
        name = signal.Signals(-returncode).name
    except ValueError:
        name = f"signal {-returncode}"
    hint = " (out of memory?)" if name == "SIGKILL" else ""
    return f"killed by {name}{hint}", name


@dataclass(frozen=True)
class Health:
    """The pool's state: not started, starting, serving, or given up (with why and the fix)."""

    state: State
    message: str | None = None


class Call:
    """One completion asked of the pool; the process that runs it settles `future`."""

    def __init__(
        self, call_id: int, request: CompletionRequest, on_token: Callable[[str], None] | None
    ) -> None:
        self.id = call_id
        self.request = request
        self.on_token = on_token
        self.future: Future[Completion] = Future()
        self.process: ModelProcess | None = None


# Inbox events of a supervisor thread: (kind, the child it concerns or None, message or None).
Event = tuple[str, "subprocess.Popen[bytes] | None", "protocol.Message | None"]


class ModelProcess:
    """One model process slot: a supervisor thread that (re)starts the child and serves calls.

    The thread starts the child itself: PR_SET_PDEATHSIG fires when the *thread* that forked
    exits, and this thread lives exactly as long as the child should.
    """

    def __init__(self, pool: ModelPool, index: int) -> None:
        self.pool = pool
        self.index = index
        self.running = False  # guarded by the pool's lock
        self.ready = False
        self.pid: int | None = None
        self.current: Call | None = None
        self._inbox: _Inbox = _Inbox()
        self._stdin: IO[bytes] | None = None
        self._write_lock = threading.Lock()

    def start(self) -> None:
        self.running = True
        threading.Thread(
            target=self._supervise, name=f"flow-model-{self.index}", daemon=True
        ).start()

    def wake(self) -> None:
        self._inbox.put(("wake", None, None))

    def stop(self) -> None:
        self._inbox.put(("stop", None, None))

    def cancel(self, call: Call) -> None:
        """Ask the child to end `call` at its next token."""
        self._send({"op": "cancel", "id": call.id})

    def _supervise(self) -> None:
        try:
            while self._run_child():
                delay = min(BACKOFF_MAX_S, BACKOFF_BASE_S * 2**self.pool.start_failures)
                if self.pool.closing.wait(delay):
                    break
        except Exception:  # never leave calls hanging on a bug here
            log.exception("local model supervisor %d failed", self.index)
            self.pool.fail_waiting(ProviderError("the local model supervisor failed"))
        finally:
            self.pool.stopped(self)

    def _spawn(self) -> subprocess.Popen[bytes]:
        child = subprocess.Popen(
            [sys.executable, "-m", MODULE, self.pool.settings.model_dump_json()],
            stdin=subprocess.PIPE,
            stdout=subprocess.PIPE,
            env={**os.environ, PARENT_ENV: str(os.getpid())},
        )
        assert child.stdin is not None and child.stdout is not None
        self._stdin, self.pid = child.stdin, child.pid
        threading.Thread(
            target=self._read, args=(child,), name=f"flow-model-{self.index}-read", daemon=True
        ).start()
        log.info("started local model process %d (pid %d)", self.index, child.pid)
        return child

    def _read(self, child: subprocess.Popen[bytes]) -> None:
        assert child.stdout is not None
        try:
            while (message := protocol.read_frame(child.stdout)) is not None:
                self._inbox.put(("frame", child, message))
        except (OSError, ValueError, protocol.ProtocolError) as exc:
            log.error("local model process %d sent garbage: %s", child.pid, exc)
            child.kill()
        self._inbox.put(("eof", child, None))

    def _run_child(self) -> bool:
        """Start a child and serve until it dies (True: start another) or the pool stops."""
        child = self._spawn()
        self.ready = False
        while True:
            kind, source, message = self._inbox.get()
            if source is not None and source is not child:
                continue  # left over from an earlier child
            if kind == "stop":
                self._stop_child(child)
                return False
            if kind == "wake":
                self._take_next()
            elif kind == "eof":
                return self._died(child)
            elif message is not None and not self._on_message(child, message):
                return False

    def _on_message(self, child: subprocess.Popen[bytes], message: protocol.Message) -> bool:
        op = message.get("op")
        call = self.current
        if op == "ready":
            self.ready = True
            self.pool.process_ready(self, message)
            self._take_next()
        elif op == "fatal":
            with contextlib.suppress(subprocess.TimeoutExpired):
                child.wait(STOP_GRACE_S)
            self.ready, self.pid = False, None
            self.pool.start_refused(protocol.error_from(message))
            return False
        elif call is None or message.get("id") != call.id:
            return True  # the tail of a call that was already settled
        elif op == "token":
            if call.on_token is not None:
                call.on_token(str(message["text"]))
        elif op in ("done", "error"):
            self.current = None
            if op == "done":
                call.future.set_result(protocol.completion_from(message))
            else:
                call.future.set_exception(protocol.error_from(message))
            self._take_next()
        return True

    def _take_next(self) -> None:
        if not self.ready or self.current is not None:
            return
        call = self.pool.next_call(self)
        if call is None:
            return
        self.current = call
        self._send(protocol.request_message(call.id, call.request))

    def _send(self, message: protocol.Message) -> None:
        with self._write_lock:
            if self._stdin is None:
                return
            # If the child is gone, its end of file arrives next and settles the call.
            with contextlib.suppress(OSError, ValueError):
                protocol.write_frame(self._stdin, message)

    def _died(self, child: subprocess.Popen[bytes]) -> bool:
        what, name = describe_exit(child.wait())
        served, self.ready, self.pid = self.ready, False, None
        self._close_stdin()
        call, self.current = self.current, None
        if call is not None:
            call.future.set_exception(
                LocalModelCrashed(
                    f"the local model process (pid {child.pid}) was {what} while generating; "
                    "a new one is starting",
                    signal=name,
                )
            )
        if served:
            log.error("local model process %d (pid %d) %s; restarting", self.index, child.pid, what)
            return not self.pool.closing.is_set()
        return self.pool.start_crashed(self, child.pid, what)

    def _stop_child(self, child: subprocess.Popen[bytes]) -> None:
        # Closing stdin is the child's signal to exit; a child stuck in native code is killed.
        self._close_stdin()
        try:
            child.wait(STOP_GRACE_S)
        except subprocess.TimeoutExpired:
            child.kill()
            child.wait()
        self.ready, self.pid = False, None
        call, self.current = self.current, None
        if call is not None:
            call.future.set_exception(
                ProviderUnavailable("the local model was shut down during generation")
            )

    def _close_stdin(self) -> None:
        with self._write_lock:
            stdin, self._stdin = self._stdin, None
        if stdin is not None:
            with contextlib.suppress(OSError):
                stdin.close()


class _Inbox:
    """A supervisor thread's events, in order (a thin typed wrapper over SimpleQueue)."""

    def __init__(self) -> None:
        import queue

        self._queue: queue.SimpleQueue[Event] = queue.SimpleQueue()

    def put(self, event: Event) -> None:
        self._queue.put(event)

    def get(self) -> Event:
        return self._queue.get()


class ModelPool:
    """`settings.instances` supervised model processes; calls wait in order for a free one.

    No side effects until the first call or `warm_up()`.
    """

    def __init__(
        self, settings: LocalSettings, *, start_failure_limit: int = START_FAILURE_LIMIT
    ) -> None:
        self.settings = settings
        self.start_failure_limit = start_failure_limit
        self.start_failures = 0  # start-up crashes in a row, across the pool
        self.closing = threading.Event()
        self.processes = [ModelProcess(self, i) for i in range(settings.instances)]
        self._lock = threading.Condition()
        self._waiting: deque[Call] = deque()
        self._ids = itertools.count(1)
        self._unavailable: str | None = None
        self._refused: ProviderError | None = None  # the last `fatal` answer, for warm_up

    # --- callers --------------------------------------------------------------------------

    async def complete(
        self, request: CompletionRequest, on_token: Callable[[str], None] | None = None
    ) -> Completion:
        """Run `request` on a free model process; cancelling the caller stops the generation.

        `on_token` (called on a supervisor thread) receives the text of each token as it comes.
        """
        call = self.submit(request, on_token)
        try:
            return await asyncio.wrap_future(call.future)
        except asyncio.CancelledError:
            self.cancel(call)
            raise

    def complete_blocking(self, request: CompletionRequest) -> Completion:
        """`complete` for synchronous callers (LangChain's `invoke`)."""
        return self.submit(request, None).future.result()

    def submit(self, request: CompletionRequest, on_token: Callable[[str], None] | None) -> Call:
        """Queue a call (starting the processes if need be); raises if the pool cannot serve."""
        with self._lock:
            self._check_serving()
            call = Call(next(self._ids), request, on_token)
            self._waiting.append(call)
            self._start_processes()
        for process in self.processes:
            process.wake()
        return call

    def cancel(self, call: Call) -> None:
        """Drop a waiting call, or stop a running one at its next token."""
        with self._lock:
            if call in self._waiting:
                self._waiting.remove(call)
                call.future.cancel()
                return
            process = call.process
        if process is not None and process.current is call:
            process.cancel(call)

    async def warm_up(self) -> None:
        """Start the model processes and wait until one has passed its self-test."""
        await asyncio.to_thread(self.wait_ready)

    def wait_ready(self, timeout_s: float | None = None) -> None:
        """Block until a process is ready; raises what stopped it (crashes, a bad model file)."""
        with self._lock:
            self._check_serving()
            self._refused = None
            self._start_processes()
            ready = self._lock.wait_for(
                lambda: (
                    self._health_locked().state in ("ready", "unavailable")
                    or self._refused is not None
                    or self.closing.is_set()
                ),
                timeout_s,
            )
            self._check_serving()
            if self._refused is not None:
                raise self._refused
            if not ready:
                raise ProviderUnavailable(f"the local model did not start in {timeout_s:g} s")

    def health(self) -> Health:
        with self._lock:
            return self._health_locked()

    def pids(self) -> list[int]:
        """Process ids of the running model processes (for operators and tests)."""
        return [p.pid for p in self.processes if p.pid is not None]

    async def aclose(self) -> None:
        """Stop the model processes (a running generation is cut short) and their threads."""
        with self._lock:
            self.closing.set()
            self._lock.notify_all()
        self.fail_waiting(ProviderUnavailable("the local model is shut down"))
        for process in self.processes:
            process.stop()
        await asyncio.to_thread(self._wait_stopped)

    # --- supervisor threads ---------------------------------------------------------------

    def next_call(self, process: ModelProcess) -> Call | None:
        with self._lock:
            while self._waiting:
                call = self._waiting.popleft()
                if call.future.set_running_or_notify_cancel():
                    call.process = process
                    return call
        return None

    def process_ready(self, process: ModelProcess, message: protocol.Message) -> None:
        with self._lock:
            self.start_failures = 0
            self._lock.notify_all()
        log.info(
            "local model process %d (pid %s) passed its self-test; llama.cpp: %s",
            process.index,
            process.pid,
            message.get("system_info"),
        )

    def start_crashed(self, process: ModelProcess, pid: int, what: str) -> bool:
        """A child died before its self-test answered; False when the pool gives up."""
        with self._lock:
            self.start_failures += 1
            log.error(
                "local model process %d (pid %d) %s during start-up (%d of %d)",
                process.index,
                pid,
                what,
                self.start_failures,
                self.start_failure_limit,
            )
            if self.closing.is_set():
                return False
            if self.start_failures < self.start_failure_limit:
                return True
            self._unavailable = (
                f"the local model process was {what} during its start-up self-test "
                f"{self.start_failures} time(s) in a row, so the `local` provider is off. "
                "The llama.cpp build most likely uses CPU instructions this machine does not "
                "allow (or FLOW_LOCAL_MODEL_PATH names a file that crashes llama.cpp). Install "
                f"the portable build, then restart flow-api: {remedy()}"
            )
            self._lock.notify_all()
        log.error("%s", self._unavailable)
        for other in self.processes:
            other.stop()
        self.fail_waiting(LocalModelUnavailable(self._unavailable))
        return False

    def start_refused(self, error: ProviderError) -> None:
        """A child said it cannot serve (bad model file): fail the waiting calls with why."""
        with self._lock:
            self._refused = error
            self._lock.notify_all()
        log.error("local model could not start: %s", error.message)
        self.fail_waiting(error)

    def fail_waiting(self, error: ProviderError) -> None:
        with self._lock:
            waiting, self._waiting = list(self._waiting), deque()
        for call in waiting:
            if call.future.set_running_or_notify_cancel():
                call.future.set_exception(error)

    def stopped(self, process: ModelProcess) -> None:
        with self._lock:
            process.running = process.ready = False
            # A call that arrived while this thread was ending must not wait forever.
            if self._waiting and not self.closing.is_set() and self._unavailable is None:
                process.start()
            self._lock.notify_all()

    # --- internals ------------------------------------------------------------------------

    def _check_serving(self) -> None:
        if self.closing.is_set():
            raise ProviderUnavailable("the local model is shut down")
        if self._unavailable is not None:
            raise LocalModelUnavailable(self._unavailable)

    def _start_processes(self) -> None:
        for process in self.processes:
            if not process.running:
                process.start()

    def _health_locked(self) -> Health:
        if self._unavailable is not None:
            return Health("unavailable", self._unavailable)
        if any(p.ready for p in self.processes):
            return Health("ready")
        if any(p.running for p in self.processes):
            return Health("starting")
        return Health("idle")

    def _wait_stopped(self) -> None:
        with self._lock:
            self._lock.wait_for(lambda: not any(p.running for p in self.processes), 10)
