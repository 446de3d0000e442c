"""What token streaming costs: worker throughput with and without it, and first-token latency.

Part 1, throughput. One `flow-api worker` (OpenAI provider on the simulator in its own process,
`--latency` s before the first token, then `--tokens-per-s`, for streamed and whole answers
alike), `--jobs` jobs queued while paused, then resumed; jobs/s and the worker's CPU ms a job.
Three setups, in alternated rounds (the machine is shared: only figures from one round compare):
  off      FLOW_STREAM_ENABLED=false: no job events written, whole answers (the path before
           streaming existed)
  on       the defaults: every job's tokens streamed from the provider and written, batched
  watched  the defaults, and `--watchers` clients streaming jobs through a `flow-api api`
           (httpx-sse), each following one job to its end, then the next
  always   (only with `--setups ...,always`) FLOW_STREAM_TOKENS=always: every call streamed

Part 2, first-token latency. `--samples` jobs, `--parallel` at a time, each watched from its
submit: the time from submit to the first `token` event at the client, beside the provider's
own time to first token (the same simulator, called directly with the OpenAI SDK's streaming);
the difference is what the service adds (queueing, worker pick-up, the stream's batching and
the SSE hop).

    python benchmarks/streaming.py [--jobs 2000] [--concurrency 500] [--latency 1]
        [--tokens-per-s 100] [--rounds 3] [--watchers 50] [--samples 200] [--parallel 10]

Prints figures; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import httpx
import openai
from _harness import (
    PROVIDER_KEY,
    SIM_MODEL,
    Child,
    Meter,
    finished,
    machine,
    python_child,
    simulator,
    table,
    valkey_server,
    worker_env,
)
from httpx_sse import aconnect_sse
from redis.asyncio import Redis

from flow_api.embedded import free_port
from flow_api.jobs import JobData
from flow_api.models import GenerateRequest
from flow_api.queue.producer import JobQueue
from flow_api.settings import RedisSettings, WorkerSettings

PROMPT = (
    "Write three sentences about a lighthouse keeper who counts ships at night, the storms "
    "that pass, the letters that never come, and the morning the lamp finally goes dark for "
    "good, number {i}."
)
WARM_UP_S = 1.0


@dataclass
class Run:
    name: str
    jobs: int
    seconds: float
    cpu_s: float
    failed: int

    @property
    def per_s(self) -> float:
        return (self.jobs - self.failed) / self.seconds

    @property
    def cpu_ms(self) -> float:
        return 1000 * self.cpu_s / self.jobs

    def row(self, round_no: int) -> list[object]:
        done = self.jobs - self.failed
        return [round_no, self.name, done, self.failed, f"{self.per_s:.0f}", f"{self.cpu_ms:.2f}"]


def flow_job(i: int) -> JobData:
    request = GenerateRequest(prompt=PROMPT.format(i=i))
    return JobData.submitted(request, provider="openai", model=SIM_MODEL, tenant="default")


def api_child(redis_url: str, queue_name: str, sim_url: str, port: int) -> Child:
    env = worker_env(redis_url, queue_name, sim_url, FLOW_API_PORT=str(port))
    return Child([sys.executable, "-m", "flow_api.cli", "api"], env=env)


async def throughput_run(
    name: str, args: argparse.Namespace, redis: Redis, redis_url: str, sim_url: str
) -> Run:
    queue_name = f"bench-{uuid.uuid4().hex[:8]}"
    queue = JobQueue(redis, RedisSettings(queue_name=queue_name), WorkerSettings())
    await queue.pause()
    ids = await queue.enqueue_many([flow_job(i) for i in range(args.jobs)])
    extra = {"FLOW_WORKER_CONCURRENCY": str(args.concurrency)}
    if name == "off":
        extra["FLOW_STREAM_ENABLED"] = "false"
    elif name == "always":
        extra["FLOW_STREAM_TOKENS"] = "always"
    worker = Child(
        [sys.executable, "-m", "flow_api.cli", "worker"],
        env=worker_env(redis_url, queue_name, sim_url, **extra),
    )
    children = [worker]
    watcher: Child | None = None
    try:
        if name == "watched":
            port = free_port()
            api = api_child(redis_url, queue_name, sim_url, port)
            children.append(api)
            await asyncio.to_thread(api.wait_for, "Application startup complete", 60)
            ids_file = Path(tempfile.gettempdir()) / f"{queue_name}.ids"
            await asyncio.to_thread(ids_file.write_text, "\n".join(ids))
            watcher = python_child(
                __file__,
                *("--child", "watch", "--api", f"http://127.0.0.1:{port}"),
                *("--ids", str(ids_file), "--watchers", str(args.watchers)),
            )
            children.append(watcher)
            await asyncio.to_thread(watcher.wait_for, "ready")
        await asyncio.to_thread(worker.wait_for, "worker consuming queue")
        await asyncio.sleep(WARM_UP_S)
        meter = Meter([worker.pid])
        meter.start()
        started = time.perf_counter()
        if watcher is not None:
            watcher.send("go")
        await queue.resume()
        while True:
            completed, failed = await finished(redis, queue_name)
            if completed + failed >= args.jobs:
                break
            await asyncio.sleep(0.02)
        seconds = time.perf_counter() - started
        meter.stop()
        if watcher is not None:
            watcher.send("stop")
            line = await asyncio.to_thread(watcher.wait_for, "watched", 60)
            name = f"watched ({line.split('watched', 1)[1].strip()})"
    finally:
        for child in children:
            await asyncio.to_thread(child.stop)
        await queue.close()
    return Run(name, args.jobs, seconds, meter.cpu_s, failed)


async def child_watch(args: argparse.Namespace) -> None:
    """Follow jobs' streams, `--watchers` at a time, from `go` until `stop` (then report)."""
    ids = (await asyncio.to_thread(Path(args.ids).read_text)).split()
    print("ready", flush=True)
    await asyncio.to_thread(sys.stdin.readline)
    events = streams = 0
    pending = iter(ids)

    async def watch(client: httpx.AsyncClient) -> None:
        nonlocal events, streams
        for job_id in pending:
            async with aconnect_sse(client, "GET", f"/api/ai/stream/{job_id}") as source:
                async for _ in source.aiter_sse():
                    events += 1
            streams += 1

    async with httpx.AsyncClient(base_url=args.api, timeout=120) as client:
        tasks = [asyncio.create_task(watch(client)) for _ in range(args.watchers)]
        await asyncio.to_thread(sys.stdin.readline)
        for task in tasks:
            task.cancel()
        await asyncio.gather(*tasks, return_exceptions=True)
    print(f"watched {streams} jobs to their end, {events} events", flush=True)


def percentile(values: Sequence[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


async def provider_first_token(sim_url: str, samples: int, parallel: int) -> list[float]:
    """The simulator's own time to first token, through the OpenAI SDK's streaming."""
    client = openai.AsyncOpenAI(api_key=PROVIDER_KEY, base_url=f"{sim_url}/v1")
    gate = asyncio.Semaphore(parallel)
    times: list[float] = []

    async def one(i: int) -> None:
        async with gate:
            started = time.perf_counter()
            stream = await client.chat.completions.create(
                model=SIM_MODEL,
                messages=[{"role": "user", "content": PROMPT.format(i=i)}],
                stream=True,
            )
            async for chunk in stream:
                if chunk.choices and chunk.choices[0].delta.content:
                    times.append(time.perf_counter() - started)
                    break
            await stream.close()

    await asyncio.gather(*(one(i) for i in range(samples)))
    await client.close()
    return times


async def service_first_token(api_url: str, samples: int, parallel: int) -> list[float]:
    """Submit → first `token` event at a client watching the job from its submit."""
    gate = asyncio.Semaphore(parallel)
    times: list[float] = []

    async def one(client: httpx.AsyncClient, i: int) -> None:
        async with gate:
            started = time.perf_counter()
            body = {"prompt": PROMPT.format(i=i)}
            job_id = (await client.post("/api/ai/generate", json=body)).json()["jobId"]
            async with aconnect_sse(client, "GET", f"/api/ai/stream/{job_id}") as source:
                async for sse in source.aiter_sse():
                    if sse.event == "token":
                        times.append(time.perf_counter() - started)
                        break

    async with httpx.AsyncClient(base_url=api_url, timeout=60) as client:
        await asyncio.gather(*(one(client, i) for i in range(samples)))
    return times


async def latency(args: argparse.Namespace, redis_url: str, sim_url: str) -> None:
    queue_name = f"bench-{uuid.uuid4().hex[:8]}"
    port = free_port()
    worker = Child(
        [sys.executable, "-m", "flow_api.cli", "worker"],
        env=worker_env(redis_url, queue_name, sim_url),
    )
    api = api_child(redis_url, queue_name, sim_url, port)
    try:
        await asyncio.to_thread(worker.wait_for, "worker consuming queue")
        await asyncio.to_thread(api.wait_for, "Application startup complete", 60)
        await asyncio.sleep(WARM_UP_S)
        url = f"http://127.0.0.1:{port}"
        await service_first_token(url, args.parallel, args.parallel)  # warm up
        provider = await provider_first_token(sim_url, args.samples, args.parallel)
        service = await service_first_token(url, args.samples, args.parallel)
    finally:
        for child in (worker, api):
            await asyncio.to_thread(child.stop)
    rows = []
    for q, label in ((0.5, "p50"), (0.99, "p99")):
        p, s = percentile(provider, q), percentile(service, q)
        rows.append([label, f"{1000 * p:.0f}", f"{1000 * s:.0f}", f"{1000 * (s - p):.0f}"])
    print(
        f"First token ({args.samples} jobs, {args.parallel} at a time; the provider answers "
        f"after {args.latency:g} s at {args.tokens_per_s:g} tokens/s)\n"
    )
    print(table(["", "provider ms", "service ms", "added by the service ms"], rows))
    print()


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    sim_args = ("--latency", str(args.latency), "--tokens-per-s", str(args.tokens_per_s))
    with valkey_server() as valkey, simulator(*sim_args) as sim:
        redis = Redis.from_url(valkey.url)
        try:
            setups = ["off", *(k for k in args.setups.split(",") if k != "off")]
            if args.rounds > 0:
                print(
                    f"\nThroughput: {args.jobs} jobs, concurrency {args.concurrency}, the "
                    f"provider answers after {args.latency:g} s at {args.tokens_per_s:g} "
                    f"tokens/s (about 40 tokens an answer)\n"
                )
                rounds: list[dict[str, Run]] = []
                for number in range(args.rounds):
                    runs: dict[str, Run] = {}
                    for key in setups:
                        runs[key] = await throughput_run(key, args, redis, valkey.url, sim.url)
                        print("  " + " | ".join(map(str, runs[key].row(number + 1))), flush=True)
                    rounds.append(runs)
                print()
                rows = [
                    [
                        i + 1,
                        r.name,
                        r.jobs - r.failed,
                        r.failed,
                        f"{r.per_s:.0f}",
                        f"{r.cpu_ms:.2f}",
                    ]
                    for i, each in enumerate(rounds)
                    for r in each.values()
                ]
                header = ["round", "setup", "completed", "failed", "jobs/s", "worker CPU ms/job"]
                print(table(header, rows))
                print()
                for key in setups[1:]:
                    per_round = [each[key].per_s / each["off"].per_s for each in rounds]
                    cpu = [each[key].cpu_ms / each["off"].cpu_ms for each in rounds]
                    print(
                        f"{key}/off jobs/s per round: "
                        + ", ".join(f"{r:.3f}" for r in per_round)
                        + f"; median {statistics.median(per_round):.3f}"
                        + f" (worker CPU a job: median {statistics.median(cpu):.3f}x)"
                    )
                print()
            if args.samples > 0:
                await latency(args, valkey.url, sim.url)
        finally:
            await redis.aclose()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=2000)
    parser.add_argument("--concurrency", type=int, default=500)
    parser.add_argument("--latency", type=float, default=1.0, help="seconds to the first token")
    parser.add_argument("--tokens-per-s", type=float, default=100.0)
    parser.add_argument("--rounds", type=int, default=3, help="0 skips the throughput part")
    parser.add_argument(
        "--setups",
        default="off,on,watched",
        help="compared with `off`; `always` streams every call (FLOW_STREAM_TOKENS=always)",
    )
    parser.add_argument("--watchers", type=int, default=50, help="clients in `watched`")
    parser.add_argument("--samples", type=int, default=200, help="0 skips the latency part")
    parser.add_argument("--parallel", type=int, default=10, help="latency jobs at a time")
    parser.add_argument("--child", help=argparse.SUPPRESS)
    parser.add_argument("--api", help=argparse.SUPPRESS)
    parser.add_argument("--ids", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    import uvloop

    parsed = parse()
    uvloop.run(child_watch(parsed) if parsed.child == "watch" else main(parsed))
