"""`flow-api up | api | worker | check | keys`: parse, build Settings, call `service`."""

from __future__ import annotations

import argparse
import asyncio
import logging
import os
import signal
import sys
from pathlib import Path

import uvloop

from flow_api.auth import commands as key_commands
from flow_api.auth.exposure import InsecureBinding
from flow_api.settings import Settings


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="flow-api", description=__doc__)
    sub = parser.add_subparsers(dest="command", required=True)
    up = sub.add_parser("up", help="embedded Valkey + API + worker, for one machine")
    up.add_argument("--data-dir", type=Path, default=Path(".flow-data"))
    up.add_argument("--port", type=int, help="API port (default 3000)")
    api = sub.add_parser("api", help="the HTTP API (production)")
    api.add_argument("--host")
    api.add_argument("--port", type=int)
    api.add_argument("--reload", action="store_true", help="restart on code change (dev)")
    sub.add_parser("worker", help="a queue worker (production)")
    sub.add_parser("check", help="exit 1 unless Redis and a provider are usable")
    key_commands.add_commands(sub)
    return parser


def app_from_env() -> object:
    """The ASGI app built from the environment (for `--reload` and other ASGI servers)."""
    from flow_api.api.app import create_app

    return create_app(Settings())


def main(argv: list[str] | None = None) -> int:
    # Until the event loop installs its own handlers, SIGTERM stops the process as Ctrl-C does
    # (a clean exit below), not with the default abrupt termination.
    signal.signal(signal.SIGTERM, signal.default_int_handler)
    args = _parser().parse_args(argv)
    settings = Settings()
    logging.basicConfig(
        level=settings.log_level.upper(),
        format="%(asctime)s %(levelname)s %(name)s: %(message)s",
    )
    for chatty in ("httpx", "httpx2", "httpcore", "openai", "anthropic"):  # a line per request
        logging.getLogger(chatty).setLevel(max(logging.WARNING, logging.root.level))
    if getattr(args, "port", None) is not None:
        settings.api.port = args.port
    if getattr(args, "host", None):
        settings.api.host = args.host
    if args.command == "keys":
        return key_commands.run(args, settings)
    from flow_api import service  # FastAPI and LangChain: imported only by the serving commands

    try:
        if args.command == "api" and args.reload:
            import uvicorn

            uvicorn.run(
                "flow_api.cli:app_from_env",
                factory=True,
                reload=True,
                host=settings.api.host,
                port=settings.api.port,
            )
        elif args.command == "api":
            uvloop.run(service.serve_api(settings))
        elif args.command == "worker":
            uvloop.run(service.run_worker(settings))
        elif args.command == "up":
            uvloop.run(service.run_up(settings, args.data_dir))
        else:
            problems = asyncio.run(service.check(settings))
            for problem in problems:
                print(f"not ok: {problem}", file=sys.stderr)
            return 1 if problems else 0
    except (service.NoProviderError, InsecureBinding) as exc:
        print(f"flow-api: {exc}", file=sys.stderr)
        return 2

    return 0


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
