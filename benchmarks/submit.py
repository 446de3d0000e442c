"""The submit path: `POST /api/ai/generate` under load, and API + worker end to end.

A real `flow-api api` process on a throwaway valkey-server (fake provider on), and a load
generator in another process (aiohttp, `--clients` concurrent connections, bounded by
`--requests` and `--seconds`, loopback only). Two phases:

  1. submit only: accepted submits (202) per second, p50 and p99 latency of the 202 answers
     (no worker running); any other answer is counted apart and shown;
  2. end to end: the same load with one `flow-api worker` (fake provider, instant answers)
     running; completed jobs/s from the first submit until every accepted job has completed.

The clock starts when the load generator, already started and connected, is told to go.

CPU seconds of the API and worker processes are reported too, to size a deployment.

    python benchmarks/submit.py [--clients 64] [--requests 5000] [--seconds 30]

Prints tables; asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import statistics
import sys
import time
from collections.abc import Sequence
from typing import Any

import orjson
from _harness import Child, Meter, machine, table, valkey_server
from redis.asyncio import Redis

from flow_api.embedded import free_port

PREFIX = "bull"


def api_env(redis_url: str, queue_name: str, port: int) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("FLOW_", "OPENAI_"))}
    env.update(
        FLOW_REDIS_URL=redis_url,
        FLOW_REDIS_QUEUE_NAME=queue_name,
        FLOW_API_PORT=str(port),
        FLOW_PROVIDER_FAKE_ENABLED="true",
        FLOW_PROVIDER_DEFAULT="fake",
        FLOW_LOCAL_ENABLED="false",
        FLOW_LOG_LEVEL="INFO",
        FLOW_WORKER_CONCURRENCY="200",
    )
    return env


# --- the load generator (a child process) ---------------------------------------------------


async def load(url: str, clients: int, requests: int, seconds: float) -> dict[str, Any]:
    """POST `requests` prompts with `clients` connections, stopping after `seconds`."""
    import aiohttp

    latencies: list[float] = []  # of 202 answers only
    statuses: dict[int, int] = {}
    sent = 0
    deadline = time.perf_counter() + seconds

    async def client(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < requests and time.perf_counter() < deadline:
            body = orjson.dumps({"prompt": f"submit {sent}", "options": {"maxTokens": 16}})
            sent += 1
            started = time.perf_counter()
            async with session.post(
                f"{url}/api/ai/generate",
                data=body,
                headers={"content-type": "application/json"},
            ) as answer:
                await answer.read()
                statuses[answer.status] = statuses.get(answer.status, 0) + 1
            if answer.status == 202:
                latencies.append(time.perf_counter() - started)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        # Start-up (imports, the session) happens before `ready`; the parent's clock starts
        # at `go`, so neither figure counts the load generator's own start.
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        deadline = time.perf_counter() + seconds
        started = time.perf_counter()
        await asyncio.gather(*(client(session) for _ in range(clients)))
        took = time.perf_counter() - started
    latencies.sort()
    if not latencies:
        raise RuntimeError(f"no submit was accepted: {statuses}")
    return {
        "accepted": len(latencies),
        "requests": sum(statuses.values()),
        "seconds": took,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "statuses": statuses,
    }


def run_load(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(load(args.url, args.clients, args.requests, args.seconds))
    print("result " + orjson.dumps(result, option=orjson.OPT_NON_STR_KEYS).decode(), flush=True)


# --- the parent ------------------------------------------------------------------------------


def flow(command: str, env: dict[str, str]) -> Child:
    return Child([sys.executable, "-m", "flow_api.cli", command], env=env)


async def wait_healthy(url: str, timeout_s: float = 30) -> None:
    import aiohttp

    deadline = time.monotonic() + timeout_s
    async with aiohttp.ClientSession() as session:
        while time.monotonic() < deadline:
            try:
                async with session.get(f"{url}/healthz") as answer:
                    if answer.status == 200:
                        return
            except aiohttp.ClientError:
                pass
            await asyncio.sleep(0.1)
    raise RuntimeError("the API did not start")


async def phase(
    args: argparse.Namespace, redis: Redis, redis_url: str, *, with_worker: bool
) -> dict[str, Any]:
    queue_name = f"submit-{os.urandom(3).hex()}"
    port = free_port()
    env = api_env(redis_url, queue_name, port)
    api = flow("api", env)
    worker = flow("worker", env) if with_worker else None
    url = f"http://127.0.0.1:{port}"
    try:
        await wait_healthy(url)
        if worker is not None:
            await asyncio.to_thread(worker.wait_for, "worker consuming queue")
        await asyncio.sleep(1.0)
        pids = [api.pid] + ([worker.pid] if worker is not None else [])
        loader = Child(
            [
                sys.executable,
                __file__,
                *("--child-url", url, "--clients", str(args.clients)),
                *("--requests", str(args.requests), "--seconds", str(args.seconds)),
            ]
        )
        await asyncio.to_thread(loader.wait_for, "ready")
        meter, api_meter = Meter(pids), Meter([api.pid])
        meter.start()
        api_meter.start()
        started = time.perf_counter()
        loader.send("go")
        line = await asyncio.to_thread(loader.wait_for, "result {", args.seconds + 60)
        result: dict[str, Any] = orjson.loads(line.strip().removeprefix("result "))
        loader.stop()
        if worker is not None:
            completed_key = f"{PREFIX}:{queue_name}:completed"
            accepted = result["accepted"]
            while True:
                if await redis.zcard(completed_key) >= accepted:
                    break
                await asyncio.sleep(0.02)
            result["e2e_seconds"] = time.perf_counter() - started
        meter.stop()
        api_meter.stop()
        result["api_cpu_ms"] = 1000 * api_meter.cpu_s / result["requests"]
        result["cpu_ms"] = 1000 * meter.cpu_s / result["accepted"]
    finally:
        for child in (api, worker):
            if child is not None:
                await asyncio.to_thread(child.stop)
    return result


async def main(args: argparse.Namespace) -> None:
    print(f"machine: {machine()}")
    print(
        f"load: {args.clients} concurrent clients, up to {args.requests} requests or "
        f"{args.seconds:g} s, from a separate process over loopback\n"
    )
    with valkey_server() as valkey:
        redis = Redis.from_url(valkey.url)
        try:
            submit = await phase(args, redis, valkey.url, with_worker=False)
            e2e = await phase(args, redis, valkey.url, with_worker=True)
        finally:
            await redis.aclose()
    rows = []
    for name, r in (("submit only (API)", submit), ("API + 1 worker", e2e)):
        rows.append(
            [
                name,
                r["requests"],
                r["accepted"],
                f"{r['accepted'] / r['seconds']:.0f}",
                f"{1000 * r['p50']:.1f}",
                f"{1000 * r['p99']:.1f}",
                f"{r['accepted'] / r['e2e_seconds']:.0f}" if "e2e_seconds" in r else "-",
                f"{r['api_cpu_ms']:.2f}",
                f"{r['cpu_ms']:.2f}",
                ", ".join(f"{k}: {v}" for k, v in sorted(r["statuses"].items())),
            ]
        )
    header = [
        "phase",
        "requests",
        "202s",
        "202s/s",
        "p50 ms",
        "p99 ms",
        "jobs/s end to end",
        "API CPU ms/req",
        "CPU ms/job (API+worker)",
        "answers",
    ]
    print(table(header, rows))


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=64, help="concurrent connections")
    parser.add_argument("--requests", type=int, default=5000, help="requests per phase, at most")
    parser.add_argument("--seconds", type=float, default=30, help="time per phase, at most")
    parser.add_argument("--child-url", dest="url", help=argparse.SUPPRESS)
    return parser.parse_args(argv)


if __name__ == "__main__":
    parsed = parse()
    if parsed.url:
        run_load(parsed)
    else:
        asyncio.run(main(parsed))
