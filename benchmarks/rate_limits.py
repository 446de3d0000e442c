"""Rate limits: shared budgets vs the naive setup (no budget, retry on 429), side by side.

Two setups run at the same time, each with its own simulator process enforcing the same request
and token limits, its own queue with a backlog, and four `flow-api worker` processes:

  ours   budgets on (FLOW_BUDGET_LIMITS set to the provider's limits)
  naive  budgets off (FLOW_BUDGET_ENABLED=false): a 429 is retried like any retryable error,
         after its Retry-After, until the job's attempts (FLOW_WORKER_ATTEMPTS, 5) run out

The simulator's limiter counts a sliding window of `--window` seconds (10 by default) instead of
a minute, so a steady state comes within seconds, not minutes; `--rpm`/`--tpm` stay per-minute
figures (the simulator is given them scaled to its window). The budget paces calls by rate, so
the shorter window asks the same of it; a bursty client gains less from the scaled window's
first burst than from a real minute's. Throughput is counted after the first window.

    python benchmarks/rate_limits.py [--rpm 600] [--tpm 15000] [--seconds 40] [--window 10]

Each job asks `maxTokens` 20 with a 10-word prompt: the simulator charges 30 tokens a call, so
15000 tokens/min allow 500 calls/min — the binding limit, under the 600 requests/min.
Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from _harness import SIM_MODEL, Child, machine, simulator, table, valkey_server, worker_env
from redis.asyncio import Redis

from flow_api.jobs import JobData
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.queue.producer import JobQueue
from flow_api.settings import RedisSettings, WorkerSettings

PREFIX = "bull"
WORKERS = 4
MAX_TOKENS = 20
PROMPT = "Summarise item {i:05d} of the lighthouse inventory in one line."  # 10 words


@dataclass
class Setup:
    name: str
    queue_name: str
    sim_url: str
    env: dict[str, str]
    children: list[Child]
    queue: JobQueue | None = None
    at_window: tuple[int, int, dict[str, Any]] | None = None  # completed, failed, sim stats
    at_end: tuple[int, int, dict[str, Any]] | None = None


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as answer:
        stats: dict[str, Any] = orjson.loads(answer.read())
    return stats


async def fill(redis: Redis, queue_name: str, jobs: int) -> JobQueue:
    queue = JobQueue(redis, RedisSettings(queue_name=queue_name, prefix=PREFIX), WorkerSettings())
    await queue.pause()
    options = GenerateOptions(max_tokens=MAX_TOKENS)
    await queue.enqueue_many(
        [
            JobData.submitted(
                GenerateRequest(prompt=PROMPT.format(i=i), options=options),
                provider="openai",
                model=SIM_MODEL,
                tenant="default",
            )
            for i in range(jobs)
        ]
    )
    return queue


async def counts(redis: Redis, queue_name: str) -> tuple[int, int]:
    completed = await redis.zcard(f"{PREFIX}:{queue_name}:completed")
    failed = await redis.zcard(f"{PREFIX}:{queue_name}:failed")
    return int(completed), int(failed)


async def snapshot(redis: Redis, setup: Setup) -> tuple[int, int, dict[str, Any]]:
    completed, failed = await counts(redis, setup.queue_name)
    return completed, failed, await asyncio.to_thread(sim_stats, setup.sim_url)


def row(setup: Setup, seconds: float, binding: float) -> list[object]:
    assert setup.at_window is not None and setup.at_end is not None
    done0, _, sim0 = setup.at_window
    done1, failed, sim1 = setup.at_end
    per_min = (done1 - done0) / seconds * 60
    calls = sim1["requests"] - sim0["requests"]
    throttled = sim1["throttled"] - sim0["throttled"]
    total_calls = sim1["requests"]
    return [
        setup.name,
        f"{per_min:.0f}",
        f"{100 * per_min / binding:.1f}%",
        done1,
        failed,
        f"{100 * throttled / calls:.1f}%" if calls else "n/a",
        f"{100 * sim1['throttled'] / total_calls:.1f}%" if total_calls else "n/a",
    ]


async def main(args: argparse.Namespace) -> None:
    scale = args.window / 60
    sim_args = [
        *("--latency", str(args.latency), "--window", str(args.window)),
        *("--rpm", str(round(args.rpm * scale)), "--tpm", str(round(args.tpm * scale))),
    ]
    cost = 10 + MAX_TOKENS
    binding = min(args.rpm, args.tpm / cost)
    which = "tokens" if args.tpm / cost < args.rpm else "requests"
    jobs = int(binding * (args.seconds + args.window) / 60 * 1.5) + 100
    print(f"machine: {machine()}")
    print(
        f"limits {args.rpm} requests/min and {args.tpm} tokens/min ({cost} tokens a call): "
        f"binding {binding:.0f} calls/min ({which}); simulator window {args.window:g} s; "
        f"{WORKERS} workers per setup; {jobs} jobs queued per setup; "
        f"{args.seconds:g} s measured after the first window\n"
    )
    limits = orjson.dumps({f"openai/{SIM_MODEL}": {"rpm": args.rpm, "tpm": args.tpm}}).decode()
    with (
        valkey_server() as valkey,
        simulator(*sim_args) as sim_ours,
        simulator(*sim_args) as sim_naive,
    ):
        redis = Redis.from_url(valkey.url)
        setups = [
            Setup(
                "ours: shared budgets",
                f"ours-{uuid.uuid4().hex[:6]}",
                sim_ours.url,
                {"FLOW_BUDGET_LIMITS": limits},
                [],
            ),
            Setup(
                "naive: no budget, retry on 429",
                f"naive-{uuid.uuid4().hex[:6]}",
                sim_naive.url,
                {"FLOW_BUDGET_ENABLED": "false"},
                [],
            ),
        ]
        try:
            for setup in setups:
                setup.queue = await fill(redis, setup.queue_name, jobs)
                env = worker_env(
                    valkey.url,
                    setup.queue_name,
                    setup.sim_url,
                    FLOW_WORKER_CONCURRENCY=str(args.concurrency),
                    **setup.env,
                )
                setup.children = [
                    Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env)
                    for _ in range(WORKERS)
                ]
            for setup in setups:
                for child in setup.children:
                    await asyncio.to_thread(child.wait_for, "worker consuming queue")
            await asyncio.sleep(1.0)
            for setup in setups:
                assert setup.queue is not None
                await setup.queue.resume()
            started = time.monotonic()
            await asyncio.sleep(args.window)
            for setup in setups:
                setup.at_window = await snapshot(redis, setup)
            measured_from = time.monotonic()
            await asyncio.sleep(args.seconds)
            for setup in setups:
                setup.at_end = await snapshot(redis, setup)
            seconds = time.monotonic() - measured_from
            print(f"ran {time.monotonic() - started:.0f} s\n")
        finally:
            for setup in setups:
                for child in setup.children:
                    await asyncio.to_thread(child.stop)
                if setup.queue is not None:
                    await setup.queue.close()
            await redis.aclose()
    header = [
        "setup",
        "calls/min",
        "of binding limit",
        "completed",
        "failed",
        "429s (measured)",
        "429s (whole run)",
    ]
    print(table(header, [row(s, seconds, binding) for s in setups]))
    print(
        "\n429s: share of provider calls answered 429 by the simulator's limiter. "
        "failed: jobs that ran out of attempts."
    )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rpm", type=int, default=600, help="provider requests per minute")
    parser.add_argument("--tpm", type=int, default=15_000, help="provider tokens per minute")
    parser.add_argument("--seconds", type=float, default=40, help="measured time")
    parser.add_argument("--window", type=float, default=10, help="simulator's limit window, s")
    parser.add_argument("--latency", type=float, default=0.5, help="simulated call, seconds")
    parser.add_argument("--concurrency", type=int, default=100, help="slots per worker")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
