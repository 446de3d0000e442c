"""`flow-api up | api | worker | check | keys | webhooks | batch`: parse, build Settings, call
`service`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import socket
import sys
from pathlib import Path
from typing import NoReturn

from flow_api import data_folder, running
from flow_api.auth import commands as key_commands
from flow_api.auth.exposure import InsecureBinding
from flow_api.batch import commands as batch_commands
from flow_api.environment import SettingsInvalid, load_settings
from flow_api.listener import listen
from flow_api.observability.logs import configure_logging
from flow_api.settings import Settings
from flow_api.startup import StartupError
from flow_api.stopping import StopRequests
from flow_api.webhooks import commands as webhook_commands


def _port(text: str) -> int:
    port = int(text) if text.isdigit() else -1
    if not 0 <= port <= 65535:
        raise argparse.ArgumentTypeError(f"{text!r} is not a port (0-65535)")
    return port


class _Parser(argparse.ArgumentParser):
    """Usage errors as one line (and exit code 2, as argparse does): the line says what is
    wrong and where the help is, without the usage block."""

    def error(self, message: str) -> NoReturn:
        self.exit(2, f"{self.prog}: {message} (see `{self.prog} --help`)\n")


def _parser() -> argparse.ArgumentParser:
    parser = _Parser(prog="flow-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="embedded Valkey + API + worker, for one machine")
    up.add_argument("--data-dir", type=Path, default=Path(".flow-data"))
    up.add_argument("--port", type=_port, help="API port (default 3000)")
    api = sub.add_parser("api", help="the HTTP API (production)")
    api.add_argument("--host")
    api.add_argument("--port", type=_port, help="API port (default 3000)")
    api.add_argument("--reload", action="store_true", help="restart on code change (dev)")
    sub.add_parser("worker", help="a queue worker (production)")
    sub.add_parser("check", help="exit 1 unless Redis and a provider are usable")
    key_commands.add_commands(sub)
    batch_commands.add_commands(sub)
    webhook_commands.add_commands(sub)
    return parser


def app_from_env() -> object:
    """The ASGI app built from the environment (for `--reload` and other ASGI servers)."""
    from flow_api.api.app import create_app

    loaded = load_settings()  # the reloader's child runs only this: configure as `main` does
    _configure_logging(loaded.settings, loaded.warnings)
    return create_app(loaded.settings)


def _configure_logging(settings: Settings, warnings: list[str]) -> None:
    configure_logging(settings.log_level, settings.log_format)
    for chatty in ("httpx", "httpx2", "httpcore", "openai", "anthropic"):  # a line per request
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.root.level))
    for warning in warnings:
        logging.getLogger("flow_api.environment").warning("%s", warning)


def main(argv: list[str] | None = None) -> int:
    # Until the event loop installs its own handlers, SIGTERM (and SIGHUP, a closed terminal)
    # stops the process as Ctrl-C does (a clean exit below), not with the default abrupt
    # termination; and the loop acts on one whose KeyboardInterrupt was lost (`stopping`).
    StopRequests.before_loop()
    args = _parser().parse_args(argv)
    try:
        loaded = load_settings()
    except SettingsInvalid as exc:
        print(f"flow-api: {exc}", file=sys.stderr)
        return exc.exit_code
    settings = loaded.settings
    _configure_logging(settings, loaded.warnings)
    if getattr(args, "port", None) is not None:
        settings.api.port = args.port
    if getattr(args, "host", None):
        settings.api.host = args.host
    if args.command == "keys":
        return key_commands.run(args, settings)
    if args.command == "batch":
        return batch_commands.run(args, settings)
    if args.command == "webhooks":
        return webhook_commands.run(args, settings)
    try:
        return _serve(args, settings)
    except (StartupError, InsecureBinding) as exc:
        print(f"flow-api: {exc}", file=sys.stderr)
        return exc.exit_code if isinstance(exc, StartupError) else 2


def _serve(args: argparse.Namespace, settings: Settings) -> int:
    """The serving commands. The folder and the port are claimed before the heavy imports
    (FastAPI, LangChain), so a second `up` or a taken port is told within a second."""
    if args.command == "api" and args.reload:
        with listen(settings) as sock:
            _serve_reloading(settings, sock)
    elif args.command == "api":
        with listen(settings) as sock:
            from flow_api import service

            running.run(service.serve_api(settings, sock))
    elif args.command == "worker":
        from flow_api import service

        running.run(service.run_worker(settings))
    elif args.command == "up":
        with data_folder.claim(args.data_dir) as folder, listen(settings) as sock:
            from flow_api import service

            running.run(service.run_up(settings, folder, sock))
    else:
        from flow_api import service

        problems = asyncio.run(service.check(settings))
        for problem in problems:
            print(f"not ok: {problem}", file=sys.stderr)
        return 1 if problems else 0
    return 0


def _serve_reloading(settings: Settings, sock: socket.socket) -> None:
    """`api --reload`: uvicorn's reloader serves on our bound `sock` and rebuilds the app from
    the environment in each child, so the address chosen here (`--host`, `--port`) is put in
    the environment the children read: they build the very settings this process checked."""
    import uvicorn

    from flow_api.api.http_protocol import JsonErrorsHttpToolsProtocol

    os.environ["FLOW_API_HOST"] = settings.api.host
    os.environ["FLOW_API_PORT"] = str(settings.api.port)
    uvicorn.run(
        "flow_api.cli:app_from_env",
        factory=True,
        reload=True,
        fd=sock.fileno(),
        http=JsonErrorsHttpToolsProtocol,
        log_config=None,  # keep the app's format (set in `app_from_env`)
        log_level=settings.log_level.lower(),
    )


def run() -> None:
    """The console script: exit without tearing the interpreter down.

    Every resource (Redis, HTTP clients, the embedded server, in-flight jobs) is closed by the
    time `main` returns; finalizing LangChain's and the SDKs' modules then takes another 0.5 s
    or more, which an orchestrator's stop or a Ctrl-C should not wait for.
    """
    try:
        code = main()
    except KeyboardInterrupt:  # a stop signal before the event loop installed its handlers
        code = 0
    logging.shutdown()
    sys.stdout.flush()
    sys.stderr.flush()
    os._exit(code)


if __name__ == "__main__":
    run()
