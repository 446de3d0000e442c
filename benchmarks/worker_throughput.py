"""Jobs/s, CPU per job and memory of one worker process: stock bullmq + LangChain vs Flow API.

Every scenario runs in fresh processes against one throwaway valkey-server and the provider
simulator in its own process (`--latency` seconds per call). A scenario's jobs are queued while
the queue is paused; the consumers start and settle; then the queue is resumed and the clock
runs until every job has finished. CPU is the consumer processes' own (user + system, from
/proc), divided by the jobs; RSS is their peak while the jobs ran (about `--concurrency` in
flight).

    python benchmarks/worker_throughput.py [--jobs 3000] [--concurrency 1000] [--latency 1]
        [--scale-concurrency 200] [--only a,b,c,d,e]

Scenarios:
  a  stock: one bullmq `Worker(concurrency=C)`, processor `ChatOpenAI(...)` with its defaults
     (httpx transport), on the default asyncio loop as bullmq's docs run it
  b  ours: `flow-api worker` (FLOW_WORKER_CONCURRENCY=C), OpenAI provider on the simulator
  c  the same chat model alone: our provider's `ChatOpenAI` called C at a time with
     `asyncio.gather` + a semaphore, no queue, uvloop: the floor (b) is measured against
  d  instant jobs (no-op processor): stock `Worker(concurrency=C)` vs our `QueueConsumer`
  e  scale-out: one vs two `flow-api worker` processes, each with --scale-concurrency slots

Prints Markdown tables with ratios; asserts nothing (this machine is shared: compare only
figures from the same run).
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import sys
import time
import uuid
from collections.abc import Awaitable, Callable, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from _harness import (
    PROVIDER_KEY,
    SIM_MODEL,
    Child,
    Meter,
    Profiler,
    machine,
    python_child,
    ratio,
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
PROFILE_DIR: Path | None = None  # --py-spy DIR
PROMPT = "Summarise the plot of a short novel about a lighthouse keeper, number {i}."


@dataclass
class Result:
    """One scenario's figures."""

    name: str
    jobs: int
    seconds: float
    cpu_s: float
    peak_rss: int
    failed: int = 0

    @property
    def per_s(self) -> float:
        return self.jobs / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.jobs

    def row(self, base: Result | None) -> list[object]:
        return [
            self.name,
            f"{self.per_s:.0f}",
            ratio(self.per_s, base.per_s) if base else "1.00x",
            f"{self.cpu_ms:.2f}",
            f"{self.peak_rss / 2**20:.0f}",
            self.failed,
        ]


HEADER = ["setup", "jobs/s", "ratio", "CPU ms/job", "peak RSS MiB", "failed"]


# --- the parent: queue, start, measure -------------------------------------------------------


def median(results: list[Result]) -> Result:
    return sorted(results, key=lambda r: r.per_s)[len(results) // 2]


def flow_job(i: int) -> JobData:
    """A job as `POST /api/ai/generate` stores it."""
    request = GenerateRequest(prompt=PROMPT.format(i=i))
    return JobData.submitted(request, provider="openai", model=SIM_MODEL, tenant="default")


async def fill(redis: Redis, queue_name: str, jobs: int, *, flow: bool) -> Queue | JobQueue:
    """Pause the queue and put `jobs` jobs in it (ours through the service's producer)."""
    if flow:
        ours = JobQueue(
            redis, RedisSettings(queue_name=queue_name, prefix=PREFIX), WorkerSettings()
        )
        await ours.pause()
        await ours.enqueue_many([flow_job(i) for i in range(jobs)])
        return ours
    queue = Queue(queue_name, {"connection": redis, "prefix": PREFIX})
    await queue.pause()
    batch = [
        {"name": "bench", "data": {"prompt": PROMPT.format(i=i)}, "opts": {}} for i in range(jobs)
    ]
    for start in range(0, jobs, 500):
        await queue.addBulk(batch[start : start + 500])
    return queue


async def finished(redis: Redis, queue_name: str) -> tuple[int, int]:
    completed = await redis.zcard(f"{PREFIX}:{queue_name}:completed")
    failed = await redis.zcard(f"{PREFIX}:{queue_name}:failed")
    return int(completed), int(failed)


async def run_queued(
    name: str,
    redis: Redis,
    jobs: int,
    start: Callable[[str], list[Child]],
    *,
    flow: bool,
    ready: str,
) -> Result:
    """Queue `jobs` (paused), start the consumers, resume, time until all have finished."""
    queue_name = f"bench-{uuid.uuid4().hex[:8]}"
    queue = await fill(redis, queue_name, jobs, flow=flow)
    children = start(queue_name)
    try:
        for child in children:
            await asyncio.to_thread(child.wait_for, ready)
        await asyncio.sleep(1.0)  # let every shard reach its blocking wait
        meter = Meter([c.pid for c in children])
        meter.start()
        profiler = Profiler([c.pid for c in children], PROFILE_DIR, name)
        profiler.start()
        started = time.perf_counter()
        await queue.resume()
        while True:
            completed, failed = await finished(redis, queue_name)
            if completed + failed >= jobs:
                break
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - started
        meter.stop()
        profiler.stop()
    finally:
        for child in children:
            await asyncio.to_thread(child.stop)
        await queue.close()
    return Result(name, jobs, seconds, meter.cpu_s, meter.peak_rss, failed)


async def run_alone(name: str, jobs: int, args: Sequence[str]) -> Result:
    """Scenario (c): the child waits for `go`, makes the calls, says `done`."""
    child = python_child(__file__, "--child", "alone", "--jobs", str(jobs), *args)
    try:
        await asyncio.to_thread(child.wait_for, "ready")
        meter = Meter([child.pid])
        meter.start()
        profiler = Profiler([child.pid], PROFILE_DIR, name)
        profiler.start()
        started = time.perf_counter()
        child.send("go")
        line = await asyncio.to_thread(child.wait_for, "done", 600)
        seconds = time.perf_counter() - started
        meter.stop()
        profiler.stop()
    finally:
        await asyncio.to_thread(child.stop)
    failed = int(line.split()[1])
    return Result(name, jobs, seconds, meter.cpu_s, meter.peak_rss, failed)


# --- the children ---------------------------------------------------------------------------


async def child_stock(args: argparse.Namespace) -> None:
    """A stock bullmq Worker; the processor is a ChatOpenAI call (defaults) or nothing."""
    from bullmq import Worker

    processor: Callable[[Any, str], Awaitable[Any]]
    if args.child == "stock-llm":
        from langchain_openai import ChatOpenAI

        chat = ChatOpenAI(model=SIM_MODEL, base_url=f"{args.sim}/v1", api_key=PROVIDER_KEY)

        async def call(job: Any, token: str) -> Any:
            return (await chat.ainvoke(job.data["prompt"])).content

        processor = call
    else:

        async def noop(job: Any, token: str) -> Any:
            return None

        processor = noop
    options = {"connection": args.redis, "prefix": PREFIX, "concurrency": args.concurrency}
    worker = Worker(args.queue, processor, {**options, "autorun": False})
    await serve(worker.run(), worker.close)


async def child_ours_noop(args: argparse.Namespace) -> None:
    """Our QueueConsumer with a handler that does nothing: the queue machinery alone."""
    from flow_api.queue.connection import connect
    from flow_api.queue.consumer import JobHandle, QueueConsumer

    async def noop(job: JobHandle) -> dict[str, Any]:
        return {}

    settings = WorkerSettings(concurrency=args.concurrency, shutdown_grace_s=5)
    redis_settings = RedisSettings(url=args.redis, queue_name=args.queue)
    redis = connect(redis_settings)
    consumer = QueueConsumer(redis, redis_settings, settings, noop)
    await serve(consumer.run(), consumer.stop)
    await redis.aclose()


async def serve(run: Awaitable[None], stop: Callable[[], Awaitable[None]]) -> None:
    """Run a consumer until SIGTERM; say `ready` once it runs."""
    loop = asyncio.get_running_loop()
    stopping: list[asyncio.Future[None]] = []
    loop.add_signal_handler(signal.SIGTERM, lambda: stopping.append(asyncio.ensure_future(stop())))
    task = asyncio.ensure_future(run)
    await asyncio.sleep(0.2)
    print("ready", flush=True)
    await task
    if stopping:
        await stopping[0]


async def child_alone(args: argparse.Namespace) -> None:
    """Scenario (c): our provider's chat model, C calls at a time, nothing queued."""
    from flow_api.providers.openai import OpenAIProvider
    from flow_api.settings import OpenAISettings

    provider = OpenAIProvider(
        OpenAISettings(api_key=PROVIDER_KEY, base_url=f"{args.sim}/v1", model=SIM_MODEL), 120
    )
    chat = provider.chat_model(SIM_MODEL)
    gate = asyncio.Semaphore(args.concurrency)
    failures = 0

    async def one(i: int) -> None:
        nonlocal failures
        async with gate:
            try:
                await chat.ainvoke(PROMPT.format(i=i))
            except Exception:
                failures += 1

    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    await asyncio.gather(*(one(i) for i in range(args.jobs)))
    print(f"done {failures}", flush=True)
    await provider.aclose()


# --- scenarios ------------------------------------------------------------------------------


def stock(kind: str, args: argparse.Namespace, redis_url: str, sim_url: str) -> Callable[..., Any]:
    def start(queue_name: str) -> list[Child]:
        return [
            python_child(
                __file__,
                *("--child", kind, "--redis", redis_url, "--queue", queue_name),
                *("--sim", sim_url, "--concurrency", str(args.concurrency)),
                *("--stock-loop", args.stock_loop),
            )
        ]

    return start


def flow_workers(
    count: int, concurrency: int, redis_url: str, sim_url: str
) -> Callable[[str], list[Child]]:
    def start(queue_name: str) -> list[Child]:
        env = worker_env(redis_url, queue_name, sim_url, FLOW_WORKER_CONCURRENCY=str(concurrency))
        return [
            Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env) for _ in range(count)
        ]

    return start


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(","))
    n, c = args.jobs, args.concurrency
    print(f"machine: {machine()}")
    print(
        f"jobs {n}, concurrency {c}, simulated call {args.latency:g} s "
        f"(ideal {c / args.latency:.0f} calls/s)\n"
    )
    with valkey_server() as valkey, simulator("--latency", str(args.latency)) as sim:
        redis = Redis.from_url(valkey.url)
        try:
            if {"a", "b", "c"} & only:
                rounds: dict[str, list[Result]] = {}
                # Rounds alternate the setups so that drifting load on this shared machine hits
                # each alike; the table shows each setup's median round (by jobs/s).
                for _ in range(args.rounds):
                    if "a" in only:
                        start = stock("stock-llm", args, valkey.url, sim.url)
                        result = await run_queued(
                            "(a) stock Worker + ChatOpenAI defaults",
                            redis,
                            n,
                            start,
                            flow=False,
                            ready="ready",
                        )
                        rounds.setdefault("a", []).append(result)
                    if "b" in only:
                        start = flow_workers(1, c, valkey.url, sim.url)
                        result = await run_queued(
                            "(b) ours: flow-api worker",
                            redis,
                            n,
                            start,
                            flow=True,
                            ready="worker consuming queue",
                        )
                        rounds.setdefault("b", []).append(result)
                    if "c" in only:
                        alone_args = ["--sim", sim.url, "--concurrency", str(c)]
                        result = await run_alone("(c) chat model alone, no queue", n, alone_args)
                        rounds.setdefault("c", []).append(result)
                if args.rounds > 1:
                    for key, results in sorted(rounds.items()):
                        each = ", ".join(f"{r.per_s:.0f}/s {r.cpu_ms:.2f} ms" for r in results)
                        print(f"({key}) rounds: {each}")
                    print()
                rows = [median(rounds[key]) for key in sorted(rounds)]
                base = rows[0]
                print(f"LLM jobs ({args.latency:g} s simulated call, concurrency {c})\n")
                print(table(HEADER, [r.row(base) for r in rows]))
                named = {r.name[:3]: r for r in rows}
                if "(b)" in named and "(c)" in named:
                    b, cc = named["(b)"], named["(c)"]
                    print(f"\n(b)/(c) = {b.per_s / cc.per_s:.2f} (goal ≥ 0.90)")
                if "(b)" in named and "(a)" in named:
                    b, a = named["(b)"], named["(a)"]
                    print(f"(b)/(a) = {b.per_s / a.per_s:.2f} (goal ≥ 2)")
                print()
            if "d" in only:
                rows = [
                    await run_queued(
                        "stock Worker, no-op",
                        redis,
                        n,
                        stock("stock-noop", args, valkey.url, sim.url),
                        flow=False,
                        ready="ready",
                    ),
                    await run_queued(
                        "ours: QueueConsumer, no-op",
                        redis,
                        n,
                        stock("ours-noop", args, valkey.url, sim.url),
                        flow=True,
                        ready="ready",
                    ),
                ]
                print(f"(d) instant jobs (no-op processor, concurrency {c})\n")
                print(table(HEADER, [r.row(rows[0]) for r in rows]))
                print(f"\nours/stock = {rows[1].per_s / rows[0].per_s:.2f} (goal ≥ 1.5)\n")
            if "e" in only:
                sc = args.scale_concurrency
                rows = [
                    await run_queued(
                        f"1 x flow-api worker ({sc} slots)",
                        redis,
                        n,
                        flow_workers(1, sc, valkey.url, sim.url),
                        flow=True,
                        ready="worker consuming queue",
                    ),
                    await run_queued(
                        f"2 x flow-api worker ({sc} slots each)",
                        redis,
                        n,
                        flow_workers(2, sc, valkey.url, sim.url),
                        flow=True,
                        ready="worker consuming queue",
                    ),
                ]
                print(f"(e) scale-out ({args.latency:g} s simulated call)\n")
                print(table(HEADER, [r.row(rows[0]) for r in rows]))
                print(f"\ntwo/one = {rows[1].per_s / rows[0].per_s:.2f} (goal ≥ 1.7)\n")
        finally:
            await redis.aclose()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per scenario")
    parser.add_argument("--concurrency", type=int, default=1000, help="slots per worker, a-d")
    parser.add_argument("--latency", type=float, default=1.0, help="simulated call, seconds")
    parser.add_argument(
        "--scale-concurrency", type=int, default=200, help="slots per worker process in (e)"
    )
    parser.add_argument("--only", default="a,b,c,d,e", help="comma-separated scenarios")
    parser.add_argument("--rounds", type=int, default=1, help="rounds of a, b, c (median)")
    parser.add_argument(
        "--stock-loop",
        choices=("asyncio", "uvloop"),
        default="asyncio",
        help="event loop of the stock Worker (a, d); ours always runs uvloop",
    )
    parser.add_argument(
        "--py-spy", type=Path, metavar="DIR", help="profile the consumers into DIR (needs py-spy)"
    )
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--redis", help=argparse.SUPPRESS)
    parser.add_argument("--queue", help=argparse.SUPPRESS)
    parser.add_argument("--sim", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


def run_child(args: argparse.Namespace) -> None:
    if args.child == "alone":
        import uvloop

        uvloop.run(child_alone(args))
    elif args.child == "ours-noop":
        import uvloop

        uvloop.run(child_ours_noop(args))
    elif args.stock_loop == "uvloop":
        import uvloop

        uvloop.run(child_stock(args))
    else:  # the default asyncio loop, as bullmq's documentation runs a Worker
        asyncio.run(child_stock(args))


if __name__ == "__main__":
    parsed = parse()
    if parsed.child:
        run_child(parsed)
    else:
        os.environ.setdefault("PYTHONUNBUFFERED", "1")
        PROFILE_DIR = parsed.py_spy
        asyncio.run(main(parsed))
