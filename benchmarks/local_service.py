"""Tokens/s of the local model through the whole service vs llama.cpp called directly.

The service path: HTTP submit → Valkey queue → worker → LangChain → model process (llama.cpp,
tokens streamed back over a pipe) → result, polled over HTTP, with a real valkey-server, uvicorn
and worker in this process and the model in its own supervised process. The direct path:
`llama_cpp.Llama.create_completion` in this process on the same prompts with the same framing,
greedy decoding and thread count. Rounds alternate so machine load hits both alike; the medians
are compared. Prints; never asserts. Goal (issue 11): service ≥ 0.95 of direct.

    python benchmarks/local_service.py [--prompts 8] [--max-tokens 64] [--rounds 3]
"""

from __future__ import annotations

import argparse
import asyncio
import statistics
import sys
import tempfile
import time
from datetime import datetime
from pathlib import Path

import httpx

sys.path.insert(0, str(Path(__file__).resolve().parent))

from local_direct import PROMPTS, Run, direct_run

from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.providers import build_registry
from flow_api.service import api_server
from flow_api.settings import (
    ApiSettings,
    LocalSettings,
    ProviderSettings,
    RedisSettings,
    Settings,
    WorkerSettings,
)
from flow_api.worker import FlowWorker


async def service_run(prompts: list[str], max_tokens: int, redis_url: str) -> Run:
    """Submit every prompt over HTTP at once (they queue on the one model), wait for all."""
    settings = Settings(
        redis=RedisSettings(url=redis_url, queue_name=f"bench-{time.monotonic_ns()}"),
        api=ApiSettings(port=free_port()),
        worker=WorkerSettings(concurrency=4, job_timeout_s=300),
        provider=ProviderSettings(default="local"),
        local=LocalSettings(enabled=True),
    )
    registry = build_registry(settings)
    server = api_server(settings, registry)
    worker = FlowWorker(settings, registry)
    serving = asyncio.create_task(server.serve())
    working = asyncio.create_task(worker.run())
    while not server.started:  # noqa: ASYNC110 - uvicorn exposes a flag, not an event
        await asyncio.sleep(0.01)
    base = f"http://127.0.0.1:{settings.api.port}"
    options = {"temperature": 0, "maxTokens": max_tokens}
    try:
        async with httpx.AsyncClient(base_url=base, timeout=30) as client:

            async def submit(prompt: str) -> str:
                answer = await client.post(
                    "/api/ai/generate", json={"prompt": prompt, "options": options}
                )
                job_id: str = answer.json()["jobId"]
                return job_id

            async def finished(job_id: str) -> tuple[int, float]:
                """Completion tokens, and when the worker recorded the job finished (epoch s)."""
                while True:
                    result = await client.get(f"/api/ai/result/{job_id}")
                    if result.status_code == 200:
                        status = (await client.get(f"/api/ai/status/{job_id}")).json()
                        at = datetime.fromisoformat(status["finishedAt"]).timestamp()
                        return int(result.json()["result"]["usage"]["completionTokens"]), at
                    if result.status_code != 202:
                        raise RuntimeError(result.text)
                    await asyncio.sleep(0.25)

            await finished(await submit(prompts[0]))  # warms the model up, untimed
            wall, cpu = time.time(), time.process_time()
            ids = [await submit(p) for p in prompts]
            # The clock stops when the worker records the last job finished, not when a poll
            # notices: polling often enough to be exact took CPU from the model on 2 cores.
            tokens, last = 0, wall
            for job_id in ids:
                count, at = await finished(job_id)
                tokens, last = tokens + count, max(last, at)
            return Run(tokens, last - wall, time.process_time() - cpu)
    finally:
        server.should_exit = True
        await worker.stop()
        await asyncio.gather(serving, working)
        await registry.aclose()


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=3)
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    valkey = EmbeddedValkey(Path(tempfile.mkdtemp(prefix="flow-bench-")))
    valkey.start()
    direct: list[Run] = []
    service: list[Run] = []
    try:
        for _ in range(args.rounds):
            direct.append(await direct_run(prompts, args.max_tokens))
            service.append(await service_run(prompts, args.max_tokens, valkey.url))
    finally:
        valkey.stop()
    print(f"prompts={len(prompts)} max_tokens={args.max_tokens} rounds={args.rounds} (alternated)")
    print(f"{'round':<8}{'direct tokens/s':>17}{'service tokens/s':>18}{'ratio':>8}")
    for index, (d, v) in enumerate(zip(direct, service, strict=True), start=1):
        print(f"{index:<8}{d.per_s:>17.1f}{v.per_s:>18.1f}{v.per_s / d.per_s:>8.2f}")
    d_median = statistics.median(r.per_s for r in direct)
    s_median = statistics.median(r.per_s for r in service)
    print(f"{'median':<8}{d_median:>17.1f}{s_median:>18.1f}{s_median / d_median:>8.2f}")
    print(f"service/direct (medians): {s_median / d_median:.2f} (goal >= 0.95)")


if __name__ == "__main__":
    asyncio.run(main())
