"""Tokens/s of llama.cpp called directly vs through the `local` provider's chat model.

Both run in this process on the same prompts, with the same framing, greedy decoding, thread
count and `max_tokens`, one call at a time, so the ratio is the cost of our layer (LangChain,
the executor hop, prompt building). Model loading and a warm-up call are not timed. Rounds
alternate direct/provider so drifting machine load hits both alike. Prints; never asserts.

    python benchmarks/local_direct.py [--prompts 8] [--max-tokens 64] [--rounds 2]
"""

from __future__ import annotations

import argparse
import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from langchain_core.messages import AIMessage, HumanMessage

from flow_api.providers import gguf
from flow_api.providers.local import (
    PLAIN_STOP,
    LocalProvider,
    Turn,
    plain_prompt,
    thread_count,
)
from flow_api.settings import LocalSettings

PROMPTS = (
    "What is the capital of France?",
    "Count from 1 to 30.",
    "Explain what a queue is in computing.",
    "Write a short poem about the sea.",
    "Name three primary colours.",
    "Why is the sky blue?",
    "Describe a cat in two sentences.",
    "List the days of the week.",
)


@dataclass(frozen=True)
class Run:
    """Completion tokens produced, the wall time and the process CPU time they took."""

    tokens: int
    seconds: float
    cpu_seconds: float

    @property
    def per_s(self) -> float:
        return self.tokens / self.seconds if self.seconds else 0.0

    @property
    def per_cpu_s(self) -> float:
        # CPU time of this process only: steadier than wall time on a shared, busy machine.
        return self.tokens / self.cpu_seconds if self.cpu_seconds else 0.0


class _Clock:
    def __init__(self) -> None:
        self.wall, self.cpu = time.perf_counter(), time.process_time()

    def run(self, tokens: int) -> Run:
        return Run(tokens, time.perf_counter() - self.wall, time.process_time() - self.cpu)


async def direct_run(
    prompts: Sequence[str], max_tokens: int, settings: LocalSettings | None = None
) -> Run:
    """`llama_cpp.Llama.create_completion` on `prompts`, one after another, in one thread."""
    return await asyncio.to_thread(_direct_run, prompts, max_tokens, settings or LocalSettings())


def _direct_run(prompts: Sequence[str], max_tokens: int, settings: LocalSettings) -> Run:
    import llama_cpp

    threads = thread_count(settings)
    llm = llama_cpp.Llama(
        model_path=str(gguf.resolve_model_file(settings)),
        n_ctx=settings.context_size,
        n_threads=threads,
        n_threads_batch=threads,
        verbose=False,
    )

    def complete(prompt: str) -> int:
        framed = plain_prompt([Turn("user", prompt)])
        result: Any = llm.create_completion(
            framed, max_tokens=max_tokens, temperature=0.0, stop=list(PLAIN_STOP)
        )
        return int(result["usage"]["completion_tokens"])

    try:
        complete(prompts[0])  # warm-up, untimed
        clock = _Clock()
        tokens = sum(complete(p) for p in prompts)
        return clock.run(tokens)
    finally:
        llm.close()


async def provider_run(
    prompts: Sequence[str], max_tokens: int, settings: LocalSettings | None = None
) -> Run:
    """The same prompts through `LocalProvider(...).chat_model(...).ainvoke`."""
    provider = LocalProvider(settings or LocalSettings())
    chat = provider.chat_model(provider.default_model)

    async def complete(prompt: str) -> int:
        answer = await chat.ainvoke([HumanMessage(prompt)], temperature=0.0, max_tokens=max_tokens)
        usage = answer.usage_metadata if isinstance(answer, AIMessage) else None
        return usage["output_tokens"] if usage else 0

    try:
        await provider.warm_up()
        await complete(prompts[0])
        clock = _Clock()
        tokens = 0
        for prompt in prompts:
            tokens += await complete(prompt)
        return clock.run(tokens)
    finally:
        await provider.aclose()


async def direct_tokens_per_s(prompts: Sequence[str], max_tokens: int) -> float:
    """Completion tokens/s calling llama.cpp directly (for comparison with the service)."""
    return (await direct_run(prompts, max_tokens)).per_s


async def provider_tokens_per_s(prompts: Sequence[str], max_tokens: int) -> float:
    """Completion tokens/s through the `local` provider's chat model, in-process."""
    return (await provider_run(prompts, max_tokens)).per_s


def _total(runs: Sequence[Run]) -> Run:
    return Run(
        sum(r.tokens for r in runs),
        sum(r.seconds for r in runs),
        sum(r.cpu_seconds for r in runs),
    )


async def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--prompts", type=int, default=len(PROMPTS))
    parser.add_argument("--max-tokens", type=int, default=64)
    parser.add_argument("--rounds", type=int, default=2)
    args = parser.parse_args()
    prompts = [PROMPTS[i % len(PROMPTS)] for i in range(args.prompts)]
    settings = LocalSettings()
    direct: list[Run] = []
    through: list[Run] = []
    for _ in range(args.rounds):
        direct.append(await direct_run(prompts, args.max_tokens, settings))
        through.append(await provider_run(prompts, args.max_tokens, settings))
    print(
        f"prompts={len(prompts)} max_tokens={args.max_tokens} rounds={args.rounds} "
        f"threads={thread_count(settings)} model={gguf.model_name(settings)}"
    )
    print(
        f"{'path':<10}{'tokens':>8}{'wall s':>9}{'tokens/s':>10}{'cpu s':>8}{'tokens/cpu-s':>14}"
        "   tokens/s per round"
    )
    for name, runs in (("direct", direct), ("provider", through)):
        t = _total(runs)
        each = "  ".join(f"{r.per_s:.1f}" for r in runs)
        print(
            f"{name:<10}{t.tokens:>8}{t.seconds:>9.2f}{t.per_s:>10.1f}"
            f"{t.cpu_seconds:>8.2f}{t.per_cpu_s:>14.1f}   {each}"
        )
    d, p = _total(direct), _total(through)
    print(
        f"provider/direct: {p.per_s / d.per_s:.2f} (wall), "
        f"{p.per_cpu_s / d.per_cpu_s:.2f} (per CPU second)"
    )


if __name__ == "__main__":
    asyncio.run(main())
