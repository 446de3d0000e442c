"""Rate limits with default settings: the shared budget vs no budget, and a greedy request.

Each scenario starts a simulator process that enforces per-minute limits and sends the
provider's rate-limit headers on every answer (`x-ratelimit-*` as OpenAI does, or
`anthropic-ratelimit-*` on the Messages API), queues a backlog and runs four `flow-api worker`
processes with DEFAULT settings: no `FLOW_BUDGET_LIMITS` (limits are learned from the headers).

  openai            jobs without maxTokens (the answer's length is learned)
  openai+maxTokens  every job asks maxTokens 20 (OpenAI charges all of it)
  anthropic         Anthropic-style limits (RPM, ITPM, OTPM) and headers, no maxTokens
  naive (baseline)  the `openai` scenario with the budget off (FLOW_BUDGET_ENABLED=false): a
                    429 is retried after its Retry-After until the attempts run out

Then `greedy`: a job asking `maxTokens: 999000` (the provider answers 400), followed by another
tenant's job: how long the second waits to start.

The simulator counts its limits over `--window` seconds (10 by default) instead of a minute,
stating per-minute figures in its headers, so a steady state comes within seconds; `--real-minute`
runs with a real 60 s window. Throughput is counted after a warm-up of one window (at most 10 s).

    python benchmarks/rate_limits.py [--seconds 30] [--window 10] [--real-minute]
        [--only openai,anthropic,...]

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
from dataclasses import dataclass, field
from typing import Any

import orjson
from _harness import (
    SIM_MODEL,
    Child,
    finished,
    machine,
    simulator,
    table,
    valkey_server,
    worker_env,
)
from redis.asyncio import Redis

from flow_api.jobs import JobData
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.queue.producer import JobQueue
from flow_api.settings import RedisSettings, WorkerSettings

PREFIX = "bull"
WORKERS = 4
PROMPT = "Summarise item {i:05d} of the lighthouse inventory in one line."  # 10 words
ANSWER_WORDS = 11  # "sim:" and the prompt's 10 words
ANTHROPIC_MODEL = "claude-sim"


@dataclass
class Scenario:
    name: str
    provider: str
    max_tokens: int | None
    sim_args: list[str]
    binding: float  # calls per minute the tightest limit allows
    which: str  # the binding limit
    env: dict[str, str] = field(default_factory=dict)


@dataclass
class Result:
    per_min: float
    completed: int
    failed: int
    calls: int
    throttled: int
    warm_calls: int  # during the warm-up
    warm_throttled: int


def sim_stats(url: str) -> dict[str, Any]:
    with urllib.request.urlopen(f"{url}/_sim/stats", timeout=10) as answer:
        stats: dict[str, Any] = orjson.loads(answer.read())
    return stats


def job_data(i: int, scenario: Scenario, tenant: str = "default") -> JobData:
    model = ANTHROPIC_MODEL if scenario.provider == "anthropic" else SIM_MODEL
    options = GenerateOptions(max_tokens=scenario.max_tokens)
    request = GenerateRequest(prompt=PROMPT.format(i=i), options=options)
    return JobData.submitted(request, provider=scenario.provider, model=model, tenant=tenant)


async def fill(redis: Redis, queue_name: str, jobs: int, scenario: Scenario) -> JobQueue:
    queue = JobQueue(redis, RedisSettings(queue_name=queue_name, prefix=PREFIX), WorkerSettings())
    await queue.pause()
    await queue.enqueue_many([job_data(i, scenario) for i in range(jobs)])
    return queue


def env_for(
    valkey_url: str, queue_name: str, sim_url: str, extra: dict[str, str]
) -> dict[str, str]:
    return worker_env(
        valkey_url,
        queue_name,
        sim_url,
        FLOW_ANTHROPIC_API_KEY="sk-ant-bench-not-a-real-key",
        FLOW_ANTHROPIC_BASE_URL=sim_url,
        FLOW_ANTHROPIC_MODEL=ANTHROPIC_MODEL,
        **extra,
    )


async def run(valkey_url: str, scenario: Scenario, args: argparse.Namespace) -> Result:
    warm = min(args.window, 10.0)
    jobs = int(scenario.binding * (args.seconds + warm) / 60 * 1.5) + 100
    queue_name = f"rl-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(valkey_url)
    children: list[Child] = []
    queue: JobQueue | None = None
    try:
        with simulator(*scenario.sim_args) as sim:
            queue = await fill(redis, queue_name, jobs, scenario)
            env = env_for(
                valkey_url,
                queue_name,
                sim.url,
                {"FLOW_WORKER_CONCURRENCY": str(args.concurrency), **scenario.env},
            )
            children = [
                Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env)
                for _ in range(WORKERS)
            ]
            for child in children:
                await asyncio.to_thread(child.wait_for, "worker consuming queue")
            await queue.resume()
            await asyncio.sleep(warm)
            done0, _ = await finished(redis, queue_name, PREFIX)
            warm_stats = await asyncio.to_thread(sim_stats, sim.url)
            measured_from = time.monotonic()
            await asyncio.sleep(args.seconds)
            done1, failed = await finished(redis, queue_name, PREFIX)
            seconds = time.monotonic() - measured_from
            stats = await asyncio.to_thread(sim_stats, sim.url)
            for child in children:
                await asyncio.to_thread(child.stop)
            children = []
    finally:
        for child in children:
            await asyncio.to_thread(child.stop)
        if queue is not None:
            await queue.close()
        await redis.aclose()
    per_min = (done1 - done0) / seconds * 60
    return Result(
        per_min,
        done1,
        failed,
        stats["requests"],
        stats["throttled"],
        warm_stats["requests"],
        warm_stats["throttled"],
    )


async def greedy(valkey_url: str, sim_args: list[str]) -> tuple[float, str]:
    """Seconds another tenant's job waited to start behind a rejected maxTokens 999000."""
    queue_name = f"greedy-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(valkey_url)
    queue = JobQueue(redis, RedisSettings(queue_name=queue_name, prefix=PREFIX), WorkerSettings())
    child: Child | None = None
    try:
        with simulator(*sim_args) as sim:
            env = env_for(valkey_url, queue_name, sim.url, {})
            child = Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env)
            await asyncio.to_thread(child.wait_for, "worker consuming queue")
            warm = Scenario("", "openai", None, [], 0, "")
            # The first job teaches the limits, as a busy service knows them.
            await queue.enqueue(job_data(0, warm))
            await _wait_done(redis, queue_name, 1)
            big = Scenario("", "openai", 999_000, [], 0, "")
            await queue.enqueue(job_data(1, big, tenant="greedy"))
            await _wait_done(redis, queue_name, 2)
            failed = await redis.zrange(f"{PREFIX}:{queue_name}:failed", 0, -1)
            reason = ""
            if failed:
                raw = await redis.hget(
                    f"{PREFIX}:{queue_name}:{failed[0].decode()}", "failedReason"
                )
                reason = (raw or b"").decode()[:90]
            other = await queue.enqueue(job_data(2, warm, tenant="other"))
            await _wait_done(redis, queue_name, 3)
            record = await redis.hmget(
                f"{PREFIX}:{queue_name}:{other}", ["timestamp", "processedOn"]
            )
            queued, started = (int(v or 0) for v in record)
            return (started - queued) / 1000, reason
    finally:
        if child is not None:
            await asyncio.to_thread(child.stop)
        await queue.close()
        await redis.aclose()


async def _wait_done(redis: Redis, queue_name: str, n: int) -> None:
    for _ in range(600):
        done, failed = await finished(redis, queue_name, PREFIX)
        if done + failed >= n:
            return
        await asyncio.sleep(0.05)
    raise TimeoutError(f"{queue_name}: fewer than {n} jobs finished in 30 s")


def scenarios(args: argparse.Namespace) -> list[Scenario]:
    common = ["--latency", str(args.latency), "--window", str(args.window)]
    # Limits high enough that a 10 s window holds over a hundred calls: the 2% headroom is then
    # a few calls of slack against the jitter of a loaded machine (at 600 calls/min it is one).
    rpm, tpm = 1_500, 24_000  # no maxTokens: 21 tokens a call, 1 143 calls/min: tokens bind
    openai_sim = [*common, "--rpm", str(rpm), "--tpm", str(tpm)]
    capped_tpm = 24_000  # maxTokens 20: 30 tokens a call, 800 calls/min: tokens bind
    anthropic_rpm, itpm, otpm = 2_400, 12_000, 120_000  # 10 input tokens a call: ITPM binds
    no_max = tpm / (10 + ANSWER_WORDS)
    return [
        Scenario("openai", "openai", None, openai_sim, min(rpm, no_max), "tokens"),
        Scenario(
            "openai+maxTokens",
            "openai",
            20,
            [*common, "--rpm", str(rpm), "--tpm", str(capped_tpm)],
            min(rpm, capped_tpm / 30),
            "tokens",
        ),
        Scenario(
            "anthropic",
            "anthropic",
            None,
            [*common, "--rpm", str(anthropic_rpm), "--itpm", str(itpm), "--otpm", str(otpm)],
            min(anthropic_rpm, itpm / 10, otpm / ANSWER_WORDS),
            "input tokens",
        ),
        Scenario(
            "naive (baseline)",
            "openai",
            None,
            openai_sim,
            min(rpm, no_max),
            "tokens",
            {"FLOW_BUDGET_ENABLED": "false"},
        ),
    ]


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(
        f"{WORKERS} workers x {args.concurrency} slots, default settings (no FLOW_BUDGET_LIMITS); "
        f"simulator window {args.window:g} s, latency {args.latency:g} s; "
        f"{args.seconds:g} s measured after a warm-up of {min(args.window, 10.0):g} s\n"
    )
    chosen = [s for s in scenarios(args) if not args.only or s.name in args.only]
    rows: list[list[object]] = []
    with valkey_server() as valkey:
        for scenario in chosen:
            result = await run(valkey.url, scenario, args)
            share = 100 * result.throttled / result.calls if result.calls else 0.0
            later = result.calls - result.warm_calls
            after = 100 * (result.throttled - result.warm_throttled) / later if later else 0.0
            rows.append(
                [
                    scenario.name,
                    f"{scenario.binding:.0f} ({scenario.which})",
                    f"{result.per_min:.0f}",
                    f"{100 * result.per_min / scenario.binding:.1f}%",
                    result.completed,
                    result.failed,
                    f"{share:.2f}%",
                    f"{after:.2f}%",
                ]
            )
            print(table(HEADER, rows[-1:]), flush=True)
        if not args.only or "greedy" in args.only:
            common = ["--latency", str(args.latency), "--window", str(args.window)]
            waited, reason = await greedy(valkey.url, [*common, "--rpm", "1500", "--tpm", "24000"])
    print()
    print(table(HEADER, rows))
    print(
        "\n429s: share of all provider calls (whole run) answered 429 by the simulator's limiter; "
        "after warm-up: of the calls in the measured time. "
        "failed: jobs that ran out of attempts."
    )
    if not args.only or "greedy" in args.only:
        print(
            f"\ngreedy: a maxTokens 999000 job failed ({reason!r}); another tenant's job then "
            f"waited {waited:.2f} s to start (before this budget: 3 049 s, issue 13)"
        )


HEADER = [
    "scenario",
    "binding limit, calls/min",
    "calls/min",
    "of binding",
    "completed",
    "failed",
    "429s",
    "429s after warm-up",
]


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=30, help="measured time per scenario")
    parser.add_argument("--window", type=float, default=10, help="simulator's limit window, s")
    parser.add_argument("--real-minute", action="store_true", help="a real 60 s window")
    parser.add_argument("--latency", type=float, default=0.5, help="simulated call, seconds")
    parser.add_argument("--concurrency", type=int, default=200, help="slots per worker")
    parser.add_argument(
        "--only", type=lambda v: v.split(","), default=[], help="comma-separated scenarios"
    )
    args = parser.parse_args(argv)
    if args.real_minute:
        args.window = 60.0
        args.seconds = max(args.seconds, 60.0)  # at least one whole real window measured
    return args


if __name__ == "__main__":
    asyncio.run(main(parse()))
