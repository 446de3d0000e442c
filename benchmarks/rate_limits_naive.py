"""Rate limits: our shared budget vs a real naive stack, and vs ours without budgets.

One simulator per run enforces OpenAI-style limits (1500 requests and 24 000 tokens a minute,
counted over a `--window` of 10 s so a steady state comes within seconds; 21 tokens a call, so
tokens bind at 1143 calls/min) and sends `x-ratelimit-*` and `Retry-After` on every answer.
Each setup gets the same backlog (the same job data), four consumer processes of `--concurrency`
slots on uvloop, and the same warm-up (`--warm-up` s) before `--seconds` s are measured:

  ours        `flow-api worker` x 4 with default settings: the budget learns the limits from
              the headers; a 429 puts the job back without spending an attempt (at most
              FLOW_BUDGET_MAX_DEFERRALS = 100 times), then 5 attempts
  no-budget   `flow-api worker` x 4 with FLOW_BUDGET_ENABLED=false and FLOW_WORKER_ATTEMPTS=50
              (the most the setting allows): a 429 spends an attempt, so the job gets as many
              tries as the settings can give it (ours: 100 free put-backs, then 5 attempts),
              each retry after the 429's Retry-After: budgets off, the attempt policy as close
              to ours as the settings allow
  stock       a naive stack: bullmq `Worker(concurrency=C)` x 4, processor `ChatOpenAI(...)`
              with its defaults (the openai SDK retries a 429 twice, after its Retry-After), jobs
              with bullmq's documented `attempts: 5, backoff: exponential 1 s`

Rounds alternate the setups, so drifting load on a shared machine hits each alike. Printed per
round: completed calls/min in the measured time (completed jobs only), failed jobs (out of
attempts), the share of provider calls answered 429; then each round's ratios and their median.

    python benchmarks/rate_limits_naive.py [--rounds 2] [--seconds 30] [--only ours,stock]

Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import urllib.request
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import orjson
from _harness import (
    PROVIDER_KEY,
    SIM_MODEL,
    Child,
    finished,
    machine,
    python_child,
    simulator,
    table,
    valkey_server,
    worker_env,
)
from bullmq import Queue
from redis.asyncio import Redis

from flow_api.jobs import JobData
from flow_api.models import GenerateRequest
from flow_api.queue.producer import JobQueue
from flow_api.settings import RedisSettings, WorkerSettings

PREFIX = "bull"
WORKERS = 4
PROMPT = "Summarise item {i:05d} of the lighthouse inventory in one line."  # 10 words
RPM, TPM = 1_500, 24_000
TOKENS_PER_CALL = 10 + 11  # the prompt's 10 words, the simulator's 11-word answer
BINDING = min(RPM, TPM / TOKENS_PER_CALL)  # calls per minute the tightest limit allows
SETUPS = ("ours", "no-budget", "stock")


@dataclass
class Result:
    """One setup's figures in one round."""

    setup: str
    per_min: float  # completed jobs a minute in the measured time
    completed: int
    failed: int
    calls: int
    throttled: int

    def row(self, round_no: int) -> list[object]:
        share = 100 * self.throttled / self.calls if self.calls else 0.0
        return [
            round_no,
            self.setup,
            f"{self.per_min:.0f}",
            f"{100 * self.per_min / BINDING:.1f}%",
            self.completed,
            self.failed,
            self.calls,
            f"{share:.2f}%",
        ]


HEADER = [
    "round",
    "setup",
    "completed calls/min",
    "of binding",
    "completed",
    "failed",
    "provider calls",
    "429s",
]


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as answer:
        stats: dict[str, Any] = orjson.loads(answer.read())
    return stats


def job_data(i: int) -> JobData:
    request = GenerateRequest(prompt=PROMPT.format(i=i))
    return JobData.submitted(request, provider="openai", model=SIM_MODEL, tenant="default")


async def fill(redis: Redis, queue_name: str, jobs: int, setup: str) -> Queue:
    """A paused queue with `jobs` jobs: ours through our producer (its options), the stock
    stack's with bullmq's documented retry options; the job data is the same."""
    if setup != "stock":
        ours = JobQueue(
            redis, RedisSettings(queue_name=queue_name, prefix=PREFIX), WorkerSettings()
        )
        await ours.pause()
        await ours.enqueue_many([job_data(i) for i in range(jobs)])
        return ours.bull
    queue = Queue(queue_name, {"connection": redis, "prefix": PREFIX})
    await queue.pause()
    opts = {"attempts": 5, "backoff": {"type": "exponential", "delay": 1000}}
    entries = [{"name": "bench", "data": job_data(i).wire(), "opts": opts} for i in range(jobs)]
    for start in range(0, jobs, 500):
        await queue.addBulk(entries[start : start + 500])
    return queue


def consumers(
    setup: str, args: argparse.Namespace, redis_url: str, queue: str, sim: str
) -> list[Child]:
    if setup == "stock":
        return [
            python_child(
                __file__,
                *("--child", "stock", "--redis", redis_url, "--queue", queue, "--sim", sim),
                *("--concurrency", str(args.concurrency)),
            )
            for _ in range(WORKERS)
        ]
    extra = {"FLOW_WORKER_CONCURRENCY": str(args.concurrency)}
    if setup == "no-budget":
        extra |= {"FLOW_BUDGET_ENABLED": "false", "FLOW_WORKER_ATTEMPTS": "50"}
    env = worker_env(redis_url, queue, sim, **extra)
    return [
        Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env) for _ in range(WORKERS)
    ]


async def run(valkey_url: str, setup: str, args: argparse.Namespace) -> Result:
    jobs = int(BINDING * (args.seconds + args.warm_up) / 60 * 1.5) + 100
    queue_name = f"naive-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(valkey_url)
    children: list[Child] = []
    sim_args = ["--latency", str(args.latency), "--window", str(args.window)]
    try:
        with simulator(*sim_args, "--rpm", str(RPM), "--tpm", str(TPM)) as sim:
            queue = await fill(redis, queue_name, jobs, setup)
            children = consumers(setup, args, valkey_url, queue_name, sim.url)
            ready = "ready" if setup == "stock" else "worker consuming queue"
            for child in children:
                await asyncio.to_thread(child.wait_for, ready)
            await queue.resume()
            await asyncio.sleep(args.warm_up)
            done0, _ = await finished(redis, queue_name, PREFIX)
            measured_from = time.monotonic()
            await asyncio.sleep(args.seconds)
            done1, failed = await finished(redis, queue_name, PREFIX)
            seconds = time.monotonic() - measured_from
            stats = await asyncio.to_thread(sim_stats, sim.url)
            for child in children:
                await asyncio.to_thread(child.stop)
            children = []
            await queue.close()
    finally:
        for child in children:
            await asyncio.to_thread(child.stop)
        await redis.aclose()
    per_min = (done1 - done0) / seconds * 60
    return Result(setup, per_min, done1, failed, stats["requests"], stats["throttled"])


# --- the stock consumer (a child process) ---------------------------------------------------


async def child_stock(args: argparse.Namespace) -> None:
    """A stock bullmq Worker whose processor is `ChatOpenAI(...)` with its defaults."""
    import signal

    from bullmq import Worker
    from langchain_openai import ChatOpenAI

    chat = ChatOpenAI(model=SIM_MODEL, base_url=f"{args.sim}/v1", api_key=PROVIDER_KEY)

    async def call(job: Any, token: str) -> Any:
        return (await chat.ainvoke(job.data["request"]["prompt"])).content

    options = {"connection": args.redis, "prefix": PREFIX, "concurrency": args.concurrency}
    worker = Worker(args.queue, call, {**options, "autorun": False})
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Future[None]] = []
    loop.add_signal_handler(
        signal.SIGTERM, lambda: stopping.append(asyncio.ensure_future(worker.close()))
    )
    task = asyncio.ensure_future(worker.run())
    await asyncio.sleep(0.2)
    print("ready", flush=True)
    await task
    if stopping:
        await stopping[0]


def _quotient(value: float, base: float) -> float:
    return value / base if base else float("inf")  # the baseline completed nothing


def _ratio(value: float, base: float) -> str:
    return f"{_quotient(value, base):.2f}"


# --- the parent ------------------------------------------------------------------------------


async def main(args: argparse.Namespace) -> None:
    chosen = [s for s in SETUPS if s in args.only]
    print(f"machine: {machine()}")
    print(
        f"{WORKERS} consumer processes x {args.concurrency} slots each, uvloop; simulator limits "
        f"{RPM} requests/min and {TPM} tokens/min over a {args.window:g} s window, "
        f"{args.latency:g} s calls; binding: {BINDING:.0f} calls/min (tokens); "
        f"warm-up {args.warm_up:g} s, then {args.seconds:g} s measured\n"
    )
    rounds: list[dict[str, Result]] = []
    with valkey_server() as valkey:
        for i in range(args.rounds):
            results: dict[str, Result] = {}
            for setup in chosen:
                results[setup] = await run(valkey.url, setup, args)
                print(table(HEADER, [results[setup].row(i + 1)]), flush=True)
            rounds.append(results)
    print()
    print(table(HEADER, [r.row(i + 1) for i, each in enumerate(rounds) for r in each.values()]))
    pairs = [(n, d) for n, d in (("ours", "stock"), ("ours", "no-budget")) if {n, d} <= set(chosen)]
    if pairs:
        print()
        rows: list[list[object]] = [
            [i + 1, *(_ratio(each[n].per_min, each[d].per_min) for n, d in pairs)]
            for i, each in enumerate(rounds)
        ]
        medians = [
            statistics.median(_quotient(each[n].per_min, each[d].per_min) for each in rounds)
            for n, d in pairs
        ]
        rows.append(["median", *(f"**{m:.2f}**" for m in medians)])
        print(table(["round", *(f"{n}/{d} completed calls/min" for n, d in pairs)], rows))
    print(
        "\ncompleted calls/min: jobs completed in the measured time (failed ones are not "
        "throughput); failed: jobs out of attempts by the end of the run; 429s: share of all "
        "provider calls the simulator's limiter refused (whole run)."
    )


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=2, help="alternated rounds")
    parser.add_argument("--seconds", type=float, default=30, help="measured time per run")
    parser.add_argument("--warm-up", type=float, default=10, help="seconds before measuring")
    parser.add_argument("--window", type=float, default=10, help="simulator's limit window, s")
    parser.add_argument("--latency", type=float, default=0.5, help="simulated call, seconds")
    parser.add_argument("--concurrency", type=int, default=200, help="slots per process")
    parser.add_argument(
        "--only", type=lambda v: v.split(","), default=list(SETUPS), help="setups, comma-separated"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--sim", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    parsed = parse()
    uvloop.run(child_stock(parsed) if parsed.child == "stock" else main(parsed))
