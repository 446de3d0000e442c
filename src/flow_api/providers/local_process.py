"""The model process: `python -m flow_api.providers.local_process <LocalSettings JSON>`.

Started and watched by `local_supervisor.ModelProcess`; the only kind of process that loads
llama.cpp. It loads the GGUF, proves the build works with one short generation (the start-up
self-test), says `ready`, then serves one call at a time, streaming a `token` message per token.

It never outlives its parent: on Linux the kernel kills it when the thread that started it
exits (PR_SET_PDEATHSIG), and everywhere a thread watching stdin exits the process when the pipe
closes, which happens however the parent dies.

`FLOW_LOCAL_TEST_FAULT=abort-at-start` makes it abort before loading anything: the tests' stand-in
for a build that crashes on the CPU it runs on.
"""

from __future__ import annotations

import ctypes
import logging
import os
import queue
import signal
import sys
import threading
from typing import IO

from flow_api.errors import FlowError
from flow_api.providers import local_protocol as protocol
from flow_api.providers.local_model import CompletionRequest, LoadedModel, Turn, load_model
from flow_api.providers.local_model import system_info as llama_system_info
from flow_api.settings import LocalSettings

log = logging.getLogger(__name__)

FAULT_ENV = "FLOW_LOCAL_TEST_FAULT"
PARENT_ENV = "FLOW_LOCAL_PARENT_PID"
PR_SET_PDEATHSIG = 1
SELF_TEST = CompletionRequest(
    turns=(Turn("user", "What is 1 + 1?"),), max_tokens=2, temperature=0.0, seed=0
)


def die_with_parent() -> None:
    """Ask Linux to SIGKILL this process when its parent goes; exit now if it already has."""
    if not sys.platform.startswith("linux"):
        return  # elsewhere the stdin watch alone does it
    libc = ctypes.CDLL(None, use_errno=True)
    libc.prctl(PR_SET_PDEATHSIG, signal.SIGKILL, 0, 0, 0)
    parent = os.environ.get(PARENT_ENV)
    if parent and os.getppid() != int(parent):  # the parent died before prctl took effect
        os._exit(0)


class Commands:
    """Reads the supervisor's messages on a thread; exits the process when the pipe closes."""

    def __init__(self, stream: IO[bytes]) -> None:
        self.stream = stream
        self.calls: queue.SimpleQueue[protocol.Message] = queue.SimpleQueue()
        self.cancelled: set[int] = set()
        self._lock = threading.Lock()

    def start(self) -> None:
        threading.Thread(target=self._read, name="flow-model-commands", daemon=True).start()

    def _read(self) -> None:
        try:
            while (message := protocol.read_frame(self.stream)) is not None:
                if message.get("op") == "cancel":
                    with self._lock:
                        self.cancelled.add(int(message["id"]))
                else:
                    self.calls.put(message)
        except (OSError, ValueError, protocol.ProtocolError) as exc:
            log.error("model process: unreadable command stream: %s", exc)
        # The parent closed the pipe or died: stop at once, even mid-generation.
        os._exit(0)

    def is_cancelled(self, call_id: int) -> bool:
        with self._lock:
            return call_id in self.cancelled

    def forget(self, call_id: int) -> None:
        with self._lock:
            self.cancelled.discard(call_id)


def serve(model: LoadedModel, commands: Commands, out: IO[bytes]) -> None:
    """Run calls one at a time until the supervisor closes the pipe."""
    while True:
        message = commands.calls.get()
        call_id = int(message["id"])

        def token(text: str, call_id: int = call_id) -> None:
            protocol.write_frame(out, {"op": "token", "id": call_id, "text": text})

        try:
            completion = model.complete(
                protocol.request_from(message),
                lambda call_id=call_id: commands.is_cancelled(call_id),  # type: ignore[misc]
                token,
            )
        except Exception as exc:  # reported to the supervisor as this call's failure
            protocol.write_frame(out, protocol.error_message("error", exc, call_id))
        else:
            protocol.write_frame(out, protocol.done_message(call_id, completion))
        finally:
            commands.forget(call_id)


def main(argv: list[str]) -> int:
    # Terminal and group signals (Ctrl-C, a service manager's SIGTERM) are for the parent, which
    # stops its model processes in order, after in-flight jobs: this one ends when its pipe closes.
    signal.signal(signal.SIGINT, signal.SIG_IGN)
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    # The channel is a private copy of stdout; fd 1 then points at stderr, so anything native
    # code prints lands in the log instead of corrupting the frames.
    out = os.fdopen(os.dup(1), "wb")
    os.dup2(2, 1)
    die_with_parent()
    logging.basicConfig(
        level=os.environ.get("FLOW_LOG_LEVEL", "INFO").upper(),
        format="%(asctime)s %(levelname)s %(name)s[model %(process)d]: %(message)s",
    )
    commands = Commands(sys.stdin.buffer)
    commands.start()  # first, so the process exits with its parent even while loading
    settings = LocalSettings.model_validate_json(argv[0])
    if os.environ.get(FAULT_ENV) == "abort-at-start":
        os.abort()
    try:
        model = load_model(settings)
        model.complete(SELF_TEST, lambda: False)
    except FlowError as exc:  # a misconfiguration (no model file, not a GGUF), not a crash
        protocol.write_frame(out, protocol.error_message("fatal", exc))
        return 0
    protocol.write_frame(
        out, {"op": "ready", "n_ctx": model.n_ctx, "system_info": llama_system_info()}
    )
    serve(model, commands, out)
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
