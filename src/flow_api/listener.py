"""The API's listening socket, bound before anything else starts, by every serving command
(`api`, `api --reload`, `up`).

A taken port is then one clear line within a second of `flow-api up` (uvicorn would only find
out after the embedded Valkey and the worker had started, and the worker kept running); and the
guard against serving beyond loopback without keys runs on the address actually bound.
"""

from __future__ import annotations

import contextlib
import os
import socket
from collections.abc import Iterator

from flow_api.auth.exposure import refuse_insecure_binding
from flow_api.settings import Settings
from flow_api.startup import StartupError


class ApiPortUnavailable(StartupError):
    """The API's address cannot be bound (taken, or not this machine's)."""

    def __init__(self, host: str, port: int, reason: str) -> None:
        super().__init__(
            f"cannot listen on {host}:{port}: {reason}. Stop what uses it, or choose another "
            f"port with FLOW_API_PORT (or --port)"
        )


@contextlib.contextmanager
def listen(settings: Settings) -> Iterator[socket.socket]:
    """A bound, listening socket for `api.host`:`api.port`, closed on exit. Raises
    `InsecureBinding` first when that address would serve jobs without authentication."""
    refuse_insecure_binding(settings)
    api = settings.api
    host = api.host.strip("[]")
    family = socket.AF_INET6 if ":" in host else socket.AF_INET
    try:
        sock = socket.create_server((host, api.port), family=family, backlog=2048)
    except OSError as exc:
        reason = os.strerror(exc.errno) if exc.errno else str(exc)
        raise ApiPortUnavailable(api.host, api.port, reason) from None
    with sock:
        yield sock
