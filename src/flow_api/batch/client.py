"""The client behind `flow-api batch …` (see `commands.py`), imported only when one runs.

`flow-api batch run | status | cancel | results`: a client of a running Flow API's batches.

`run` uploads a JSONL file, starts a batch, shows its progress and writes every line's result to
`--out`, in input order (OpenAI's output line format, failures included). Input lines are either
OpenAI batch lines, or plain ones: `{"custom_id": …, "prompt": …, "options": {…}}` with the
options of `POST /api/ai/generate`. The batch runs on the server: Ctrl-C stops only this client,
and the same command later picks the same batch up again (from `<out>.state.json`, beside
`--out`), so no line runs twice. It exits 1 when any line failed, 130 when interrupted.

The client is the official `openai` SDK pointed at the service (`--url`, `FLOW_BATCH_API_URL`;
the key from `--api-key` or `FLOW_BATCH_API_KEY`).
"""

from __future__ import annotations

import argparse
import contextlib
import hashlib
import sys
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path
from typing import IO, Any

import openai
import orjson
from openai.types import Batch
from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeRemainingColumn

from flow_api.batch.requests import ENDPOINT
from flow_api.settings import Settings

ENDED = ("completed", "failed", "expired", "cancelled")
POLL_S = 0.5
_OPTION_FIELDS = {"temperature": "temperature", "maxTokens": "max_tokens", "seed": "seed"}


class CommandError(Exception):
    """A problem the command explains in one line (exit 1)."""


def run(args: argparse.Namespace, settings: Settings) -> int:
    url = args.url or settings.batch.api_url or f"http://localhost:{settings.api.port}"
    secret = settings.batch.api_key
    key = args.api_key or (secret.get_secret_value() if secret else "none")
    client = openai.OpenAI(base_url=f"{url.rstrip('/')}/v1", api_key=key, max_retries=3)
    console = Console(stderr=True, highlight=False, soft_wrap=True)
    try:
        if args.batch_command == "run":
            return _run(client, console, args.input, args.out, args.provider, args.model)
        if args.batch_command == "status":
            _print_status(console, client.batches.retrieve(args.batch_id))
            return 0
        if args.batch_command == "cancel":
            _print_status(console, client.batches.cancel(args.batch_id))
            return 0
        batch = client.batches.retrieve(args.batch_id)
        if batch.status not in ENDED:
            raise CommandError(f"batch {batch.id} is {batch.status}: no results yet")
        with _output(args.out) as out:
            _write_results(client, batch, out)
        return 0
    except CommandError as exc:
        console.print(f"flow-api: {exc}")
        return 1
    except openai.APIStatusError as exc:
        console.print(f"flow-api: the API answered {exc.status_code}: {exc.message}")
        return 1
    except openai.APIConnectionError:
        console.print(f"flow-api: cannot reach the API at {url} (set --url or FLOW_BATCH_API_URL)")
        return 1
    finally:
        client.close()


# --- run ------------------------------------------------------------------------------------


def _run(
    client: openai.OpenAI,
    console: Console,
    source: Path,
    out: Path,
    provider: str | None,
    model: str | None,
) -> int:
    if not source.is_file():
        raise CommandError(f"no input file {source}")
    state_path = out.with_name(out.name + ".state.json")
    fingerprint = _fingerprint(source, provider, model)
    state = _read_state(state_path)
    if state is not None and state.get("input") != fingerprint:
        raise CommandError(
            f"{state_path} belongs to another input or provider/model; delete it to start over"
        )
    if state is None:
        with tempfile.TemporaryFile() as converted:
            lines = _convert(source, converted, provider, model)
            converted.seek(0)
            uploaded = client.files.create(file=(source.name, converted), purpose="batch")
        batch = client.batches.create(
            input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
        )
        state = {"input": fingerprint, "batch_id": batch.id, "lines": lines}
        _write_state(state_path, state)
        console.print(f"batch {batch.id}: {lines} lines (state in {state_path})")
    else:
        console.print(f"resuming batch {state['batch_id']} (from {state_path})")
    try:
        batch = _follow(client, console, str(state["batch_id"]))
    except KeyboardInterrupt:
        console.print(
            f"interrupted: batch {state['batch_id']} goes on in the service; "
            "run the same command again to resume"
        )
        return 130
    if batch.status == "failed":
        for error in (batch.errors.data or []) if batch.errors else []:
            console.print(f"line {error.line}: {error.code}: {error.message}")
        state_path.unlink(missing_ok=True)
        raise CommandError(f"batch {batch.id} failed validation; nothing ran")
    with _output(out) as sink:
        _write_results(client, batch, sink)
    state_path.unlink(missing_ok=True)
    counts = batch.request_counts
    done, failed = (counts.completed, counts.failed) if counts else (0, 0)
    took = (batch.completed_at or batch.cancelled_at or batch.expired_at or 0) - batch.created_at
    console.print(
        f"batch {batch.id} {batch.status}: {done} completed, {failed} failed "
        f"in {took} s; results in {out}"
    )
    return 1 if failed or batch.status != "completed" else 0


def _follow(client: openai.OpenAI, console: Console, batch_id: str) -> Batch:
    """Poll the batch until it ends, with a live progress bar on the terminal."""
    columns = (
        TextColumn("[bold]{task.description}"),
        BarColumn(),
        MofNCompleteColumn(),
        TextColumn("failed {task.fields[failed]} · in flight {task.fields[flight]}"),
        TextColumn("{task.fields[rate]} lines/s"),
        TimeRemainingColumn(),
    )
    with Progress(*columns, console=console, transient=False) as progress:
        task = progress.add_task("validating", total=None, failed=0, flight=0, rate="-")
        seen_at, seen_done = time.monotonic(), None
        while True:
            batch = client.batches.retrieve(batch_id)
            counts = batch.request_counts
            done = (counts.completed + counts.failed) if counts else 0
            if seen_done is None:
                seen_at, seen_done = time.monotonic(), done
            elapsed = time.monotonic() - seen_at
            rate = f"{(done - seen_done) / elapsed:.1f}" if elapsed > 1 else "-"
            queued = int(getattr(batch, "lines_queued", 0) or 0)
            progress.update(
                task,
                description=batch.status,
                total=counts.total if counts and counts.total else None,
                completed=done,
                failed=counts.failed if counts else 0,
                flight=max(0, queued - done),
                rate=rate,
            )
            if batch.status in ENDED:
                return batch
            time.sleep(POLL_S)


def _convert(source: Path, sink: IO[bytes], provider: str | None, model: str | None) -> int:
    """Copy the input as OpenAI batch lines (plain lines converted, `--provider`/`--model`
    applied); returns the line count. Blank lines are dropped; others go as they are, so the
    service names what is wrong with them."""
    lines = 0
    with source.open("rb") as lines_in:
        for raw in lines_in:
            if not raw.strip():
                continue
            try:
                item = orjson.loads(raw)
            except orjson.JSONDecodeError:
                sink.write(raw.rstrip(b"\r\n") + b"\n")
                lines += 1
                continue
            if isinstance(item, dict) and "prompt" in item and "body" not in item:
                item = _from_plain(item)
            if isinstance(item, dict) and isinstance(item.get("body"), dict):
                _choose_model(item["body"], provider, model)
            sink.write(orjson.dumps(item) + b"\n")
            lines += 1
    return lines


def _from_plain(item: dict[str, Any]) -> dict[str, Any]:
    """`{"custom_id", "prompt", "options"}` → an OpenAI batch line."""
    options = dict(item.get("options") or {})
    messages: list[dict[str, Any]] = []
    if "system" in options:
        messages.append({"role": "system", "content": options.pop("system")})
    messages.append({"role": "user", "content": item.get("prompt")})
    body: dict[str, Any] = {"messages": messages}
    provider, model = options.pop("provider", None), options.pop("model", None)
    if provider or model:
        body["model"] = f"{provider}/{model or ''}" if provider else model
    if "stop" in options:
        body["stop"] = options.pop("stop")
    for name, field in _OPTION_FIELDS.items():
        if name in options:
            body[field] = options.pop(name)
    body.update(options)  # anything else: the service refuses it, naming the line
    return {"custom_id": item.get("custom_id"), "method": "POST", "url": ENDPOINT, "body": body}


def _choose_model(body: dict[str, Any], provider: str | None, model: str | None) -> None:
    if provider is None and model is None:
        return
    if provider is None:
        body["model"] = model
        return
    body["model"] = f"{provider}/{model or ''}"


def _fingerprint(source: Path, provider: str | None, model: str | None) -> str:
    digest = hashlib.sha256(f"{provider}\0{model}\0".encode())
    with source.open("rb") as lines_in:
        while piece := lines_in.read(1 << 20):
            digest.update(piece)
    return digest.hexdigest()


def _read_state(path: Path) -> dict[str, Any] | None:
    try:
        state = orjson.loads(path.read_bytes())
    except FileNotFoundError:
        return None
    except orjson.JSONDecodeError:
        raise CommandError(f"{path} is not a state file; delete it to start over") from None
    return state if isinstance(state, dict) else None


def _write_state(path: Path, state: dict[str, Any]) -> None:
    """Atomically: an interrupted write leaves the old state or none, never half of one."""
    partial = path.with_name(path.name + ".partial")
    partial.write_bytes(orjson.dumps(state))
    partial.replace(path)


# --- results ----------------------------------------------------------------------------------


@contextlib.contextmanager
def _output(path: Path | None) -> Iterator[IO[bytes]]:
    if path is None:
        yield sys.stdout.buffer
        return
    partial = path.with_name(path.name + ".partial")
    with partial.open("wb") as sink:
        yield sink
    partial.replace(path)


def _write_results(client: openai.OpenAI, batch: Batch, sink: IO[bytes]) -> None:
    """The output and error files merged back into input order (each is in input order)."""
    order = _input_order(client, batch.input_file_id)
    outputs = _lines(client, batch.output_file_id)
    errors = _lines(client, batch.error_file_id)
    pending = [next(outputs, None), next(errors, None)]
    sources = [outputs, errors]
    while any(item is not None for item in pending):
        ranks = [order.get(item[0], len(order)) if item is not None else None for item in pending]
        pick = 0 if ranks[1] is None or (ranks[0] is not None and ranks[0] <= ranks[1]) else 1
        chosen = pending[pick]
        assert chosen is not None
        sink.write(chosen[1] + b"\n")
        pending[pick] = next(sources[pick], None)


def _input_order(client: openai.OpenAI, file_id: str) -> dict[str, int]:
    order: dict[str, int] = {}
    for custom_id, _ in _lines(client, file_id):
        order.setdefault(custom_id, len(order))
    return order


def _lines(client: openai.OpenAI, file_id: str | None) -> Iterator[tuple[str, bytes]]:
    """(custom_id, line) of a stored file, streamed."""
    if file_id is None:
        return
    with client.files.with_streaming_response.content(file_id) as response:
        for raw in response.iter_lines():
            if raw:
                item = orjson.loads(raw)
                yield str(item.get("custom_id")), raw.encode()


def _print_status(console: Console, batch: Batch) -> None:
    counts = batch.request_counts
    total, done, failed = (counts.total, counts.completed, counts.failed) if counts else (0, 0, 0)
    console.print(
        f"batch {batch.id}: {batch.status}; {total} lines, {done} completed, {failed} failed"
    )
    for name in ("output_file_id", "error_file_id"):
        if getattr(batch, name):
            console.print(f"  {name}: {getattr(batch, name)}")
