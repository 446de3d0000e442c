"""Worker throughput with metrics and tracing on vs off, in alternated rounds of the same run.

    python benchmarks/observability_overhead.py [--jobs 3000] [--concurrency 1000]
        [--latency 1] [--rounds 3]

Both setups are one `flow-api worker` on the provider simulator, measured as
`worker_throughput.py` measures its scenario (b): jobs queued while paused, the worker started
and settled, then the clock runs until every job has finished.

- off: the defaults. No metrics port, no OTEL_* variables: spans are OpenTelemetry's no-op ones.
  The in-process counters still count (they always do; a scrape only reads them).
- on: `FLOW_METRICS_WORKER_PORT` set and scraped every second (Prometheus' default is 15 s),
  and `OTEL_EXPORTER_OTLP_ENDPOINT` pointing at a loopback OTLP/HTTP sink in this process, so
  every attempt and provider-call span is recorded, batched, encoded and sent.

Prints every round, each round's on/off ratio of completed jobs/s, and their median (goal:
on/off >= 0.95, at most 5% overhead). Asserts nothing.
"""

from __future__ import annotations

import argparse
import asyncio
import os
import sys
import threading
from collections.abc import Iterator, Sequence
from contextlib import contextmanager, suppress
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

import httpx
from _harness import Child, machine, simulator, valkey_server, worker_env
from redis.asyncio import Redis
from worker_throughput import Result, Setup, alternate, run_queued

from flow_api.embedded import free_port


class _Sink(BaseHTTPRequestHandler):
    """An OTLP/HTTP receiver that accepts every export and keeps only a count."""

    received = 0

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers.get("content-length", "0")))
        type(self).received += 1
        self.send_response(200)
        self.send_header("content-type", "application/x-protobuf")
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *_: object) -> None:
        return


@contextmanager
def otlp_sink() -> Iterator[str]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_port}"
    finally:
        server.shutdown()
        server.server_close()


async def scrape_every_second(port: int, stop: asyncio.Event) -> int:
    """What Prometheus does, 15 times as often; returns the scrapes answered."""
    answered = 0
    async with httpx.AsyncClient() as client:
        while not stop.is_set():
            try:
                answer = await client.get(f"http://127.0.0.1:{port}/metrics")
                answered += answer.status_code == 200
            except httpx.TransportError:
                pass  # not listening yet
            with suppress(TimeoutError):
                await asyncio.wait_for(stop.wait(), 1.0)
    return answered


async def main(args: argparse.Namespace) -> None:
    n, c = args.jobs, args.concurrency
    print(f"machine: {machine()}")
    print(f"jobs {n}, concurrency {c}, simulated call {args.latency:g} s\n")
    with (
        valkey_server() as valkey,
        simulator("--latency", str(args.latency)) as sim,
        otlp_sink() as sink,
    ):
        assert valkey.process is not None
        redis = Redis.from_url(valkey.url)
        vpid = valkey.process.pid

        def worker(**extra: str) -> Setup:
            def start(queue_name: str) -> list[Child]:
                env = worker_env(
                    valkey.url, queue_name, sim.url, FLOW_WORKER_CONCURRENCY=str(c), **extra
                )
                return [Child([sys.executable, "-m", "flow_api.cli", "worker"], env=env)]

            name = "on: metrics scraped + traces exported" if extra else "off: defaults"
            return lambda: run_queued(
                name, redis, n, start, ready="worker consuming queue", valkey_pid=vpid
            )

        async def on() -> Result:
            port = free_port()
            stop = asyncio.Event()
            scraper = asyncio.create_task(scrape_every_second(port, stop))
            try:
                return await worker(
                    FLOW_METRICS_WORKER_PORT=str(port),
                    OTEL_EXPORTER_OTLP_ENDPOINT=sink,
                    OTEL_BSP_SCHEDULE_DELAY="1000",
                )()
            finally:
                stop.set()
                scrapes = await scraper
                print(f"  (on: {scrapes} scrapes answered, {_Sink.received} OTLP exports so far)")

        try:
            title = f"Observability overhead ({args.latency:g} s simulated call, concurrency {c})"
            setups: dict[str, Setup] = {"off": worker(), "on": on}
            await alternate(title, setups, [("on", "off", "goal >= 0.95")], args.rounds)
        finally:
            await redis.aclose()


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--jobs", type=int, default=3000, help="jobs per run")
    parser.add_argument("--concurrency", type=int, default=1000, help="worker slots")
    parser.add_argument("--latency", type=float, default=1.0, help="simulated call, seconds")
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds")
    return parser.parse_args(argv)


if __name__ == "__main__":
    os.environ.setdefault("PYTHONUNBUFFERED", "1")
    asyncio.run(main(parse()))
