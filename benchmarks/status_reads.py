"""Job reads per second: the store's one-snapshot read beside the earlier three round trips.

`GET /api/ai/status/{jobId}` reads one stored job. It used to take three round trips (the job's
hash, then its state, then its log when failed), and a job finishing between them was reported
half old, half new (issue 21); now one Lua script returns all three at one instant. This script
measures both reads side by side on the same jobs of one throwaway valkey-server: `--readers`
concurrent readers, each reading random jobs for `--seconds`, rounds alternating.

    python benchmarks/status_reads.py [--jobs 2000] [--readers 50] [--seconds 3] [--rounds 3]

Prints a Markdown table; asserts nothing (compare only figures from the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import random
import time
import uuid
from collections.abc import Awaitable, Callable

import uvloop
from _harness import machine, ratio, table, valkey_server
from bullmq import Job

from flow_api.jobs import JobData
from flow_api.models import GenerateRequest
from flow_api.queue.connection import connect
from flow_api.queue.producer import JobQueue
from flow_api.queue.store import JobStore
from flow_api.settings import RedisSettings, WorkerSettings

Read = Callable[[str], Awaitable[object]]


def three_round_trips(queue: JobQueue) -> Read:
    """The baseline: how the store read a job before (hash, state, then logs if failed)."""

    async def read(job_id: str) -> object:
        raw = await queue.bull.backend.getJobData(job_id)
        job = Job.fromJSON(queue.bull, raw, job_id)
        if await queue.bull.getJobState(job_id) == "failed":
            await queue.bull.getJobLogs(job_id)
        return job

    return read


async def reads_per_s(read: Read, ids: list[str], readers: int, seconds: float) -> float:
    done = 0
    stop_at = time.perf_counter() + seconds

    async def reader() -> None:
        nonlocal done
        while time.perf_counter() < stop_at:
            await read(random.choice(ids))
            done += 1

    started = time.perf_counter()
    await asyncio.gather(*(reader() for _ in range(readers)))
    return done / (time.perf_counter() - started)


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    with valkey_server() as valkey:
        settings = RedisSettings(url=valkey.url, queue_name=f"reads-{uuid.uuid4().hex[:8]}")
        redis = connect(settings)
        queue = JobQueue(redis, settings, WorkerSettings())
        try:
            data = JobData.submitted(
                GenerateRequest(prompt="How many reads a second?"),
                provider="fake",
                model="echo",
                tenant="default",
            )
            ids = await queue.enqueue_many([data] * args.jobs)
            store = JobStore(queue)
            setups = {"three round trips (before)": three_round_trips(queue)}
            setups["one snapshot (now)"] = store.fetch
            figures: dict[str, list[float]] = {name: [] for name in setups}
            for _ in range(args.rounds):
                for name, read in setups.items():
                    figures[name].append(await reads_per_s(read, ids, args.readers, args.seconds))
            print(
                f"{args.jobs} waiting jobs, {args.readers} concurrent readers, "
                f"median of {args.rounds} rounds\n"
            )
            medians = {name: sorted(f)[len(f) // 2] for name, f in figures.items()}
            base = medians["three round trips (before)"]
            rows = [[name, f"{m:.0f}", ratio(m, base)] for name, m in medians.items()]
            print(table(["read", "reads/s", "ratio"], rows))
        finally:
            await queue.close()
            await redis.aclose()


def parse() -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--readers", type=int, default=50)
    parser.add_argument("--seconds", type=float, default=3.0)
    parser.add_argument("--rounds", type=int, default=3)
    return parser.parse_args()


if __name__ == "__main__":
    uvloop.run(main(parse()))
