"""Jobs/s, CPU per job and memory of one worker process: stock bullmq + LangChain vs Flow API.

Every scenario runs in fresh processes against one throwaway valkey-server and the provider
simulator in its own process (`--latency` seconds per call). A scenario's jobs are queued while
the queue is paused, the same way for every setup (our producer: the same job data and the same
BullMQ options, attempts included); the consumers start and settle (one warm-up second for
every setup); then the queue is resumed and the clock runs until every job has finished.
jobs/s counts completed jobs only; failed jobs are shown beside them. CPU is the consumer
processes' own (user + system, from /proc) and, separately, the valkey-server's, divided by
the jobs finished; RSS is the consumers' peak while the jobs ran.

Every setup runs on the same event loop: uvloop by default (`flow-api worker` always runs it),
`--stock-loop asyncio` puts the stock Worker on the default asyncio loop instead (as bullmq's
docs run it) and says so in the setup's name.

    python benchmarks/worker_throughput.py [--jobs 3000] [--concurrency 1000] [--latency 1]
        [--scale-concurrency 200] [--only a,b,c,d,e] [--rounds 3]

Scenarios:
  a  stock: one bullmq `Worker(concurrency=C)`, processor `ChatOpenAI(...)` with its defaults
     (httpx transport)
  b  ours: `flow-api worker` (FLOW_WORKER_CONCURRENCY=C), OpenAI provider on the simulator
  c  the same chat model alone: our provider's chat model called C at a time with
     `asyncio.gather` + a semaphore, no queue: the floor (b) is measured against
  d  instant jobs (no-op processor): stock `Worker(concurrency=C)` vs our `QueueConsumer`
  e  scale-out: one vs two `flow-api worker` processes, each with --scale-concurrency slots

Each group (a-c, d, e) runs `--rounds` alternated rounds, so drifting load on a shared machine
hits every setup alike; it prints every round, each round's ratios and their median. Asserts
nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
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
    simulator,
    table,
    valkey_server,
    worker_env,
)
from redis.asyncio import Redis

from flow_api.jobs import JobData
from flow_api.models import GenerateRequest
from flow_api.queue.producer import JobQueue
from flow_api.settings import RedisSettings, WorkerSettings

PREFIX = "bull"
WARM_UP_S = 1.0  # every setup settles this long after saying it is ready, before the clock
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
    valkey_cpu_s: float | None = None

    @property
    def completed(self) -> int:
        return self.jobs - self.failed

    @property
    def per_s(self) -> float:
        """Completed jobs per second (failed ones are not throughput)."""
        return self.completed / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.jobs

    def row(self, round_no: int) -> list[object]:
        valkey = "-" if self.valkey_cpu_s is None else f"{1000 * self.valkey_cpu_s / self.jobs:.2f}"
        return [
            round_no,
            self.name,
            self.completed,
            self.failed,
            f"{self.per_s:.0f}",
            f"{self.cpu_ms:.2f}",
            valkey,
            f"{self.peak_rss / 2**20:.0f}",
        ]


HEADER = [
    "round",
    "setup",
    "completed",
    "failed",
    "completed jobs/s",
    "CPU ms/job",
    "Valkey CPU ms/job",
    "peak RSS MiB",
]


# --- the parent: queue, start, measure -------------------------------------------------------


def flow_job(i: int) -> JobData:
    """A job as `POST /api/ai/generate` stores it."""
    request = GenerateRequest(prompt=PROMPT.format(i=i))
    return JobData.submitted(request, provider="openai", model=SIM_MODEL, tenant="default")


async def fill(redis: Redis, queue_name: str, jobs: int) -> JobQueue:
    """Pause the queue and put `jobs` jobs in it through the service's producer.

    Every setup, stock or ours, gets these same jobs (data and BullMQ options, attempts
    included), so no setup is measured on a lighter payload.
    """
    queue = JobQueue(redis, RedisSettings(queue_name=queue_name, prefix=PREFIX), WorkerSettings())
    await queue.pause()
    await queue.enqueue_many([flow_job(i) for i in range(jobs)])
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
    ready: str,
    valkey_pid: int,
) -> Result:
    """Queue `jobs` (paused), start the consumers, resume, time until all have finished."""
    queue_name = f"bench-{uuid.uuid4().hex[:8]}"
    queue = await fill(redis, queue_name, jobs)
    children = start(queue_name)
    try:
        for child in children:
            await asyncio.to_thread(child.wait_for, ready)
        await asyncio.sleep(WARM_UP_S)  # let every consumer reach its blocking wait
        meter = Meter([c.pid for c in children])
        valkey_meter = Meter([valkey_pid])
        meter.start()
        valkey_meter.start()
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
        valkey_meter.stop()
        profiler.stop()
    finally:
        for child in children:
            await asyncio.to_thread(child.stop)
        await queue.close()
    return Result(name, jobs, seconds, meter.cpu_s, meter.peak_rss, failed, valkey_meter.cpu_s)


async def run_alone(name: str, jobs: int, args: Sequence[str]) -> Result:
    """Scenario (c): the child waits for `go`, makes the calls, says `done`."""
    child = python_child(__file__, "--child", "alone", "--jobs", str(jobs), *args)
    try:
        await asyncio.to_thread(child.wait_for, "ready")
        await asyncio.sleep(WARM_UP_S)  # the same settling time as the queued setups
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
            return (await chat.ainvoke(job.data["request"]["prompt"])).content

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


Setup = Callable[[], Awaitable[Result]]


def median(values: Sequence[float]) -> float:
    return statistics.median(values)


async def alternate(
    title: str,
    setups: dict[str, Setup],
    ratios: Sequence[tuple[str, str, str]],
    rounds: int,
) -> None:
    """Run `setups` in alternated rounds; print every round, each round's ratios, the medians.

    `ratios` are (numerator key, denominator key, goal text): jobs/s of one setup over
    another's, computed within each round, so both sides saw the same load.
    """
    results: list[dict[str, Result]] = []
    for _ in range(rounds):
        results.append({key: await setup() for key, setup in setups.items()})
    print(f"{title}\n")
    rows = [r.row(i + 1) for i, each in enumerate(results) for r in each.values()]
    print(table(HEADER, rows))
    print()
    ratio_header = ["round", *(f"{n}/{d}" for n, d, _ in ratios)]
    ratio_rows: list[list[object]] = [
        [i + 1, *(f"{each[n].per_s / each[d].per_s:.2f}" for n, d, _ in ratios)]
        for i, each in enumerate(results)
    ]
    medians = [median([each[n].per_s / each[d].per_s for each in results]) for n, d, _ in ratios]
    ratio_rows.append(["median", *(f"**{m:.2f}**" for m in medians)])
    print(table(ratio_header, ratio_rows))
    for (n, d, goal), m in zip(ratios, medians, strict=True):
        print(f"median {n}/{d} over {rounds} rounds = {m:.2f} ({goal})")
    print()


async def main(args: argparse.Namespace) -> None:
    only = set(args.only.split(","))
    n, c = args.jobs, args.concurrency
    loop = "uvloop" if args.stock_loop == "uvloop" else "default asyncio loop"
    print(f"machine: {machine()}")
    print(
        f"jobs {n}, concurrency {c}, simulated call {args.latency:g} s "
        f"(ideal {c / args.latency:.0f} calls/s); stock Worker on {loop}, ours on uvloop\n"
    )
    with valkey_server() as valkey, simulator("--latency", str(args.latency)) as sim:
        assert valkey.process is not None
        redis = Redis.from_url(valkey.url)
        vpid = valkey.process.pid

        def queued(name: str, start: Callable[[str], list[Child]], ready: str) -> Setup:
            return lambda: run_queued(name, redis, n, start, ready=ready, valkey_pid=vpid)

        try:
            group: dict[str, Setup] = {}
            if "a" in only:
                group["a"] = queued(
                    f"(a) stock Worker + ChatOpenAI defaults ({args.stock_loop})",
                    stock("stock-llm", args, valkey.url, sim.url),
                    "ready",
                )
            if "b" in only:
                group["b"] = queued(
                    "(b) ours: flow-api worker (uvloop)",
                    flow_workers(1, c, valkey.url, sim.url),
                    "worker consuming queue",
                )
            if "c" in only:
                alone_args = ["--sim", sim.url, "--concurrency", str(c)]
                group["c"] = lambda: run_alone(
                    "(c) chat model alone, no queue (uvloop)", n, alone_args
                )
            ratios = [
                (num, den, goal)
                for num, den, goal in (("b", "a", "goal >= 2"), ("b", "c", "goal >= 0.90"))
                if num in group and den in group
            ]
            if group:
                title = f"LLM jobs ({args.latency:g} s simulated call, concurrency {c})"
                await alternate(title, group, ratios, args.rounds)
            if "d" in only:
                noop = {
                    "stock": queued(
                        f"(d) stock Worker, no-op ({args.stock_loop})",
                        stock("stock-noop", args, valkey.url, sim.url),
                        "ready",
                    ),
                    "ours": queued(
                        "(d) ours: QueueConsumer, no-op (uvloop)",
                        stock("ours-noop", args, valkey.url, sim.url),
                        "ready",
                    ),
                }
                title = f"(d) instant jobs (no-op processor, concurrency {c})"
                await alternate(title, noop, [("ours", "stock", "goal >= 1.5")], args.rounds)
            if "e" in only:
                sc = args.scale_concurrency
                scale = {
                    "one": queued(
                        f"(e) 1 x flow-api worker ({sc} slots)",
                        flow_workers(1, sc, valkey.url, sim.url),
                        "worker consuming queue",
                    ),
                    "two": queued(
                        f"(e) 2 x flow-api worker ({sc} slots each)",
                        flow_workers(2, sc, valkey.url, sim.url),
                        "worker consuming queue",
                    ),
                }
                title = f"(e) scale-out ({args.latency:g} s simulated call, {sc} slots a process)"
                await alternate(title, scale, [("two", "one", "goal >= 1.7")], args.rounds)
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
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds of each group")
    parser.add_argument(
        "--stock-loop",
        choices=("asyncio", "uvloop"),
        default="uvloop",
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
