"""`flow-api batch run | status | cancel | results`: the arguments; the work is `client.py`,
imported only when a batch command runs (the SDK and `rich` are not loaded for `up` or `api`)."""

from __future__ import annotations

import argparse
from pathlib import Path
from typing import Any

from flow_api.settings import Settings


def add_commands(sub: Any) -> None:
    """Add `batch` and its subcommands to the CLI's subparsers."""
    batch = sub.add_parser("batch", help="run a JSONL file of prompts as a batch")
    actions = batch.add_subparsers(dest="batch_command", required=True)
    run = actions.add_parser("run", help="upload, run with a progress bar, write results")
    run.add_argument("input", type=Path, help="JSONL: OpenAI batch lines or plain prompt lines")
    run.add_argument("--out", type=Path, required=True, help="results, one JSON line each")
    run.add_argument("--provider", help="run every line on this provider")
    run.add_argument("--model", help="run every line on this model")
    for name in ("status", "cancel", "results"):
        action = actions.add_parser(name, help=f"{name} of a batch")
        action.add_argument("batch_id")
        if name == "results":
            action.add_argument("--out", type=Path, help="default: stdout")
    for parser in [run, *(actions.choices[n] for n in ("status", "cancel", "results"))]:
        parser.add_argument("--url", help="the API (default FLOW_BATCH_API_URL or localhost:PORT)")
        parser.add_argument("--api-key", help="default FLOW_BATCH_API_KEY")


def run(args: argparse.Namespace, settings: Settings) -> int:
    from flow_api.batch import client

    return client.run(args, settings)
