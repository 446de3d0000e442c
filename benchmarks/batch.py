"""A 10 000-line batch through `/v1/batches`, against the same prompts posted one by one.

One throwaway valkey-server, one provider simulator process (`--latency` seconds an answer),
one `flow-api api` and one `flow-api worker` process (`--concurrency` slots) on it, the same
for both rounds, run in turn:

  1. batch: upload the JSONL file (`POST /v1/files`), `POST /v1/batches`, poll the batch every
     0.5 s until it ends, download the output file;
  2. one by one (the baseline): `--clients` concurrent clients each post a prompt
     (`POST /api/ai/generate`), poll its result every 0.25 s until it is there, and go on with
     the next prompt, until every prompt has its answer.

Both clocks run from the first request to the last answer in hand. The API process's peak RSS
(sampled every 0.1 s) and CPU seconds are measured over each round, beside its RSS before.

    python benchmarks/batch.py [--lines 10000] [--clients 64] [--latency 0.2] [--concurrency 200]

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import time
from dataclasses import dataclass

import aiohttp
import orjson
import psutil
from _harness import Child, Meter, machine, simulator, table, valkey_server, worker_env

from flow_api.embedded import free_port


@dataclass
class Round:
    name: str
    seconds: float
    answers: int
    rss_before: int
    peak_rss: int
    api_cpu_s: float


def prompts(lines: int) -> list[dict[str, object]]:
    return [{"prompt": f"question {i}", "options": {"maxTokens": 16}} for i in range(lines)]


def batch_file(lines: int) -> bytes:
    return b"".join(
        orjson.dumps(
            {
                "custom_id": f"q{i}",
                "method": "POST",
                "url": "/v1/chat/completions",
                "body": {
                    "messages": [{"role": "user", "content": item["prompt"]}],
                    "max_tokens": 16,
                },
            }
        )
        + b"\n"
        for i, item in enumerate(prompts(lines))
    )


async def run_batch(url: str, lines: int) -> int:
    """The batch round; returns the output file's line count."""
    content = batch_file(lines)
    async with aiohttp.ClientSession(base_url=url) as session:
        form = aiohttp.FormData()
        form.add_field("purpose", "batch")
        form.add_field("file", content, filename="prompts.jsonl")
        async with session.post("/v1/files", data=form) as answer:
            uploaded = await answer.json()
        body = {"input_file_id": uploaded["id"], "endpoint": "/v1/chat/completions"}
        async with session.post("/v1/batches", json={**body, "completion_window": "24h"}) as answer:
            batch = await answer.json()
        while batch["status"] not in ("completed", "failed", "expired", "cancelled"):
            await asyncio.sleep(0.5)
            async with session.get(f"/v1/batches/{batch['id']}") as answer:
                batch = await answer.json()
        if batch["status"] != "completed" or batch["output_file_id"] is None:
            raise RuntimeError(f"the batch ended {batch['status']}: {batch}")
        async with session.get(f"/v1/files/{batch['output_file_id']}/content") as answer:
            output = await answer.read()
    return output.count(b"\n")


async def run_one_by_one(url: str, lines: int, clients: int) -> int:
    """The baseline round; returns how many answers came back."""
    pending = list(reversed(prompts(lines)))
    answers = 0

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal answers
        while pending:
            body = pending.pop()
            async with session.post("/api/ai/generate", json=body) as answer:
                job_id = (await answer.json())["jobId"]
            while True:
                async with session.get(f"/api/ai/result/{job_id}") as answer:
                    if answer.status == 200:
                        await answer.read()
                        answers += 1
                        break
                    if answer.status != 202:
                        raise RuntimeError(f"job {job_id}: {answer.status} {await answer.text()}")
                await asyncio.sleep(0.25)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(base_url=url, connector=connector) as session:
        await asyncio.gather(*(client(session) for _ in range(clients)))
    return answers


async def measure(name: str, api_pid: int, scenario: object) -> Round:
    rss_before = psutil.Process(api_pid).memory_info().rss
    meter = Meter([api_pid])
    meter.start()
    started = time.perf_counter()
    answers = await scenario  # type: ignore[misc]
    seconds = time.perf_counter() - started
    meter.stop()
    return Round(name, seconds, answers, rss_before, meter.peak_rss, meter.cpu_s)


async def main(args: argparse.Namespace) -> None:
    print(machine())
    with valkey_server() as valkey, simulator("--latency", str(args.latency)) as sim:
        queue = f"batch-{os.urandom(3).hex()}"
        port = free_port()
        env = worker_env(
            valkey.url,
            queue,
            sim.url,
            FLOW_API_PORT=str(port),
            FLOW_WORKER_CONCURRENCY=str(args.concurrency),
            # The baseline's clients are one tenant submitting 10 000 jobs: no submit limit.
            FLOW_AUTH_REQUESTS_PER_MINUTE="0",
        )
        api = Child([sys.executable, "-m", "flow_api.cli", "api"], env=env)
        worker = Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env)
        try:
            api.wait_for("Application startup complete")
            worker.wait_for("slots live")
            url = f"http://127.0.0.1:{port}"
            await run_one_by_one(url, 200, args.clients)  # warm-up: both processes, the SDK
            rounds = [
                await measure("batch (/v1/batches)", api.pid, run_batch(url, args.lines)),
                await measure(
                    f"one by one, {args.clients} clients",
                    api.pid,
                    run_one_by_one(url, args.lines, args.clients),
                ),
            ]
        finally:
            api.stop()
            worker.stop()
    mib = 2**20
    rows = [
        (
            r.name,
            r.answers,
            f"{r.seconds:.1f}",
            f"{r.answers / r.seconds:.0f}",
            f"{r.rss_before / mib:.0f}",
            f"{r.peak_rss / mib:.0f}",
            f"{r.api_cpu_s:.1f}",
        )
        for r in rounds
    ]
    print(
        f"{args.lines} prompts; simulator latency {args.latency} s; one worker with "
        f"{args.concurrency} slots; one API process"
    )
    header = ("round", "answers", "wall s", "lines/s", "API RSS before, MiB", "API peak, MiB")
    print(table((*header, "API CPU s"), rows))
    batch, baseline = rounds
    print(
        f"batch wall time vs one by one: {batch.seconds / baseline.seconds:.2f}x; "
        f"API CPU: {batch.api_cpu_s / max(baseline.api_cpu_s, 1e-9):.2f}x"
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--lines", type=int, default=10_000)
    parser.add_argument("--clients", type=int, default=64)
    parser.add_argument("--latency", type=float, default=0.2)
    parser.add_argument("--concurrency", type=int, default=200)
    asyncio.run(main(parser.parse_args()))
