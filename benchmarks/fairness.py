"""Fair share between tenants vs one FIFO line: a small tenant's wait behind a big backlog.

Tenant A submits `--backlog` jobs (20 000 by default, 500 per round trip, as a batch client
would); then tenant B submits `--small` jobs (20), one request each. `--workers` `flow-api
worker` processes (default settings, `--concurrency` slots each) run them against the provider
simulator answering after `--latency` seconds. Run twice on the same machine:

  fifo (baseline)  the producer with `FLOW_WORKER_FAIR_SHARE=false`: one FIFO line, as before
  fair share       the default: per-tenant lines taken in round-robin

Printed: B's start delay (from its submit to the start of its first attempt) p50/p99/max, and
A's throughput (its jobs completed per second, from its first submit to its last completion),
fair beside fifo. Both rounds run on the same workers and queue after an untimed warm-up
(`--warm-up` jobs): the workers are the same either way, only the producer decides whether
jobs wait in tenant lines. Then what one take costs (BullMQ's take script with the fair
release, one client, `--take-jobs` takes) with one tenant and with `--tenants` tenants waiting,
beside fifo.

    python benchmarks/fairness.py [--backlog 20000] [--small 20] [--workers 2]
        [--concurrency 200] [--latency 0.2] [--tenants 5000] [--take-jobs 10000]

Prints a table; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

import orjson
from _harness import SIM_MODEL, Child, machine, simulator, table, valkey_server, worker_env
from redis.asyncio import Redis

from flow_api.jobs import JobData
from flow_api.models import GenerateRequest
from flow_api.queue.producer import JobQueue
from flow_api.queue.slot_worker import SlotWorker
from flow_api.settings import RedisSettings, WorkerSettings

PREFIX = "bull"


@dataclass
class Result:
    b_delays_s: list[float]
    a_jobs_per_s: float
    a_seconds: float
    failed: int


def job(tenant: str, i: int) -> JobData:
    request = GenerateRequest(prompt=f"{tenant} job {i:05d}: one line, please.")
    return JobData.submitted(request, provider="openai", model=SIM_MODEL, tenant=tenant)


async def times(redis: Redis, queue_name: str, ids: Sequence[str]) -> list[tuple[int, int, int]]:
    """(submitted, first attempt started, finished) in ms of each job; the start is the
    worker's own `attempt` log line (BullMQ's `processedOn` is stamped when the finishing
    slot's previous call was prepared, not when this job started)."""
    pipe = redis.pipeline(transaction=False)
    for job_id in ids:
        pipe.hmget(f"{PREFIX}:{queue_name}:{job_id}", ["timestamp", "finishedOn"])
        pipe.lindex(f"{PREFIX}:{queue_name}:{job_id}:logs", 0)
    replies = await pipe.execute()
    rows = []
    for (submitted, finished), first_line in zip(replies[::2], replies[1::2], strict=True):
        started = orjson.loads(first_line)["at"] if first_line else 0
        rows.append((int(submitted or 0), int(started), int(finished or 0)))
    return rows


async def drained(redis: Redis, queue_name: str, total: int) -> int:
    """Wait until `total` jobs of the queue have finished; returns how many failed."""
    completed, failed = f"{PREFIX}:{queue_name}:completed", f"{PREFIX}:{queue_name}:failed"
    deadline = time.monotonic() + 60 + total / 20
    while int(await redis.zcard(completed)) + int(await redis.zcard(failed)) < total:
        if time.monotonic() > deadline:
            raise TimeoutError(f"{queue_name}: not every job finished")
        await asyncio.sleep(0.25)
    return int(await redis.zcard(failed))


async def run(redis: Redis, queue: JobQueue, before: int, args: argparse.Namespace) -> Result:
    """One round on a drained queue that has finished `before` jobs so far."""
    name = queue.bull.name
    failed_before = int(await redis.zcard(f"{PREFIX}:{name}:failed"))
    a_ids = await queue.enqueue_many([job("a", i) for i in range(args.backlog)])
    b_ids = [await queue.enqueue(job("b", i)) for i in range(args.small)]
    failed = await drained(redis, name, before + args.backlog + args.small)
    a_times = await times(redis, name, a_ids)
    b_times = await times(redis, name, b_ids)
    a_seconds = (max(t[2] for t in a_times) - min(t[0] for t in a_times)) / 1000
    return Result(
        b_delays_s=sorted((started - submitted) / 1000 for submitted, started, _ in b_times),
        a_jobs_per_s=len(a_ids) / a_seconds,
        a_seconds=a_seconds,
        failed=failed - failed_before,
    )


async def compare(valkey_url: str, sim_url: str, args: argparse.Namespace) -> list[list[object]]:
    """Both rounds on the same workers and queue (the workers are the same either way: only
    the producer decides whether jobs wait in tenant lines), after an untimed warm-up."""
    queue_name = f"fair-{uuid.uuid4().hex[:6]}"
    redis = Redis.from_url(valkey_url)
    settings = RedisSettings(queue_name=queue_name, prefix=PREFIX)
    env = worker_env(valkey_url, queue_name, sim_url, FLOW_WORKER_CONCURRENCY=str(args.concurrency))
    children = [
        Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env)
        for _ in range(args.workers)
    ]
    rows: list[list[object]] = []
    try:
        for child in children:
            await asyncio.to_thread(child.wait_for, "worker consuming queue")
        done = 0
        warm = JobQueue(redis, settings, WorkerSettings())
        await warm.enqueue_many([job("warm", i) for i in range(args.warm_up)])
        done += args.warm_up
        await drained(redis, queue_name, done)
        await warm.close()
        for name, fair in (("fifo (baseline)", False), ("fair share", True)):
            queue = JobQueue(redis, settings, WorkerSettings(fair_share=fair))
            try:
                result = await run(redis, queue, done, args)
            finally:
                await queue.close()
            done += args.backlog + args.small
            delays = result.b_delays_s
            rows.append(
                [
                    name,
                    f"{percentile(delays, 0.5):.3f}",
                    f"{percentile(delays, 0.99):.3f}",
                    f"{max(delays):.3f}",
                    f"{result.a_jobs_per_s:.0f}",
                    f"{result.a_seconds:.1f}",
                    result.failed,
                ]
            )
            print(table(HEADER, rows[-1:]), flush=True)
    finally:
        for child in children:
            await asyncio.to_thread(child.stop)
        await redis.aclose()
    return rows


async def take_cost(valkey_url: str, tenants: int, fair: bool, jobs: int) -> float:
    """Takes per second of BullMQ's take script (with the fair release) from one client, with
    `jobs` jobs spread over `tenants` tenants: what a take costs as tenants grow."""
    settings = RedisSettings(url=valkey_url, queue_name=f"take-{uuid.uuid4().hex[:6]}")
    redis = Redis.from_url(valkey_url)
    queue = JobQueue(redis, settings, WorkerSettings(fair_share=fair))
    worker = SlotWorker(settings.queue_name, _never_run, {"connection": valkey_url})
    try:
        await queue.enqueue_many([job(f"t{i % tenants}", i) for i in range(jobs)])
        started = time.perf_counter()
        for n in range(jobs):
            assert await worker.getNextJob(f"bench:{n}") is not None
        return jobs / (time.perf_counter() - started)
    finally:
        await worker.close()
        await queue.close()
        await redis.aclose()


async def _never_run(job: object, token: str) -> None:
    raise AssertionError("this worker only takes")


def percentile(values: list[float], share: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[round(share * 100) - 1]


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(
        f"tenant A: {args.backlog} jobs, then tenant B: {args.small}; {args.workers} workers x "
        f"{args.concurrency} slots; simulator latency {args.latency:g} s\n"
    )
    with valkey_server() as valkey, simulator("--latency", str(args.latency)) as sim:
        rows = await compare(valkey.url, sim.url, args)
        costs = [
            (label, await take_cost(valkey.url, tenants, fair, args.take_jobs))
            for label, tenants, fair in (
                ("fifo (baseline)", 1, False),
                ("fair share, 1 tenant", 1, True),
                (f"fair share, {args.tenants} tenants", args.tenants, True),
            )
        ]
    print()
    print(table(HEADER, rows))
    fifo, fair = (float(row[4]) for row in rows)
    print(f"\nA's throughput, fair share vs fifo: {100 * (fair / fifo - 1):+.1f}%")
    print(f"\nTake cost: {args.take_jobs} takes by one client, one round trip each:")
    print(table(["queue", "takes/s"], [[label, f"{rate:.0f}"] for label, rate in costs]))


HEADER = [
    "queue",
    "B start delay p50, s",
    "p99, s",
    "max, s",
    "A jobs/s",
    "A's backlog done in, s",
    "failed",
]


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--backlog", type=int, default=20_000, help="tenant A's jobs")
    parser.add_argument("--small", type=int, default=20, help="tenant B's jobs")
    parser.add_argument("--workers", type=int, default=2, help="flow-api worker processes")
    parser.add_argument("--concurrency", type=int, default=200, help="slots per worker")
    parser.add_argument("--latency", type=float, default=0.2, help="simulated call, seconds")
    parser.add_argument("--warm-up", type=int, default=1000, help="untimed jobs first")
    parser.add_argument("--tenants", type=int, default=5000, help="tenants in the take-cost run")
    parser.add_argument("--take-jobs", type=int, default=10_000, help="takes timed per case")
    return parser.parse_args(argv)


if __name__ == "__main__":
    asyncio.run(main(parse()))
