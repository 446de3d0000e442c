"""Redis memory per job, by prompt size: waiting, and completed (kept for the retention).

What the README's memory arithmetic ("Running at scale") is built from. For each prompt size,
`--jobs` jobs are queued on a throwaway valkey-server (`used_memory` read before and after), then
an in-process worker completes them with the fake model (answers cut to `--answer-tokens` words),
and `used_memory` is read again. Two runs per size, side by side: completed jobs cut to
`FLOW_WORKER_KEEP_PROMPT_CHARS` (1024, the default) and the baseline, keeping whole prompts.

    python benchmarks/job_memory.py [--jobs 300] [--sizes 100,1000,10000,50000]

Prints a Markdown table of bytes per job; asserts nothing. `drain` is what taking and finishing
one job adds (negative: finishing frees memory), which `FLOW_ADMISSION_DRAIN_BYTES_PER_JOB`
must cover.
"""

from __future__ import annotations

import argparse
import asyncio
import logging
import uuid

import uvloop
from _harness import machine, table, valkey_server
from redis.asyncio import Redis

from flow_api.jobs import JobData
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.providers import build_registry
from flow_api.queue.connection import connect
from flow_api.queue.producer import JobQueue
from flow_api.settings import (
    LocalSettings,
    ProviderSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)
from flow_api.worker import FlowWorker


async def used_memory(redis: Redis) -> int:
    return int((await redis.info("memory"))["used_memory"])


async def measure(url: str, size: int, jobs: int, answer: int, keep: int) -> tuple[int, int]:
    """(bytes per waiting job, bytes per completed job) for `jobs` prompts of `size` chars."""
    settings = Settings(
        redis=RedisSettings(url=url, queue_name=f"mem-{uuid.uuid4().hex[:8]}"),
        worker=WorkerSettings(concurrency=50, keep_prompt_chars=keep),
        provider=ProviderSettings(fake_enabled=True, default="fake"),
        local=LocalSettings(enabled=False),
    )
    redis = connect(settings.redis)
    queue = JobQueue(redis, settings.redis, settings.worker)
    try:
        await queue.bull.pause()  # queue structures exist before the first reading
        before = await used_memory(redis)
        prompt = ("word " * (size // 5 + 1))[:size]
        request = GenerateRequest(prompt=prompt, options=GenerateOptions(max_tokens=answer))
        data = JobData.submitted(request, provider="fake", model="echo", tenant="default")
        await queue.enqueue_many([data] * jobs)
        waiting = await used_memory(redis)
        registry = build_registry(settings)
        worker = FlowWorker(settings, registry)
        running = asyncio.create_task(worker.run())
        await queue.bull.resume()
        completed_key = queue.bull.toKey("completed")
        while await redis.zcard(completed_key) < jobs:
            assert not running.done(), running
            await asyncio.sleep(0.1)
        await worker.stop()
        await running
        await registry.aclose()
        await redis.delete(*[k async for k in redis.scan_iter(match="flow:*:worker:*")])
        completed = await used_memory(redis)
    finally:
        await queue.close()
        await redis.aclose()
    return (waiting - before) // jobs, (completed - before) // jobs


async def main(jobs: int, sizes: list[int], answer: int) -> None:
    logging.basicConfig(level=logging.WARNING)
    rows = []
    with valkey_server() as server:
        await measure(server.url, 100, jobs, answer, 1024)  # warm-up: scripts, first keys
        for size in sizes:
            waiting, trimmed = await measure(server.url, size, jobs, answer, 1024)
            _, whole = await measure(server.url, size, jobs, answer, 0)
            rows.append(
                [
                    f"{size:,}",
                    f"{waiting:,}",
                    f"{trimmed:,}",
                    f"{trimmed - waiting:+,}",
                    f"{whole:,}",
                    f"{whole - waiting:+,}",
                ]
            )
    print(f"\n{machine()}")
    print(f"{jobs} jobs per size; answers of {answer} words (fake model); bytes of used_memory\n")
    print(
        table(
            [
                "prompt chars",
                "waiting job",
                "completed (prompt cut to 1024)",
                "drain",
                "baseline: completed, whole prompt",
                "baseline drain",
            ],
            rows,
        )
    )


if __name__ == "__main__":
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--jobs", type=int, default=300)
    parser.add_argument("--sizes", default="100,1000,10000,50000")
    parser.add_argument("--answer-tokens", type=int, default=16)
    args = parser.parse_args()
    uvloop.run(main(args.jobs, [int(s) for s in args.sizes.split(",")], args.answer_tokens))
