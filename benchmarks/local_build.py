"""Tokens/s of llama.cpp builds side by side: this environment's (portable) and others (native).

Each interpreter (this one first, then every `--python`) loads the bundled GGUF in a child
process and runs the same greedy generations with the thread count the service uses; rounds
alternate between builds so machine load hits them alike, and the medians are printed beside
each build's compiled-in CPU features. Only llama-cpp-python is needed in the other environments.
Prints; never asserts.

    python benchmarks/local_build.py --python /tmp/native-venv/bin/python [--rounds 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import subprocess
import sys

from flow_api.providers import gguf
from flow_api.providers.local_model import PLAIN_STOP, Turn, plain_prompt, thread_count
from flow_api.settings import LocalSettings

PROMPTS = (
    "What is the capital of France?",
    "Count from 1 to 30.",
    "Explain what a queue is in computing.",
    "Write a short poem about the sea.",
)

# Run by each interpreter: only llama_cpp and the standard library.
CHILD = """
import json, sys, time, llama_cpp
path, threads, max_tokens, stop, prompts = json.loads(sys.argv[1])
llm = llama_cpp.Llama(model_path=path, n_ctx=2048, n_threads=threads, n_threads_batch=threads,
                      verbose=False)
run = lambda p: llm.create_completion(p, max_tokens=max_tokens, temperature=0.0, stop=stop)
run(prompts[0])
started, tokens = time.perf_counter(), 0
for prompt in prompts:
    tokens += run(prompt)["usage"]["completion_tokens"]
print(json.dumps({"tokens_per_s": tokens / (time.perf_counter() - started),
                  "system_info": llama_cpp.llama_print_system_info().decode()}))
"""


def measure(python: str, args: str) -> dict[str, object]:
    out = subprocess.run([python, "-c", CHILD, args], capture_output=True, text=True, check=True)
    result: dict[str, object] = json.loads(out.stdout.strip().splitlines()[-1])
    return result


def features(info: str) -> str:
    """What a build was compiled with: `CPU : SSE3 = 1 | AVX512 = 0 | ...` -> `SSE3 ...`."""
    parts = (part.split("=") for part in info.split("|"))
    on = [name.split()[-1] for name, *value in parts if value and value[0].strip() == "1"]
    return " ".join(on)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--python", action="append", default=[], help="another interpreter")
    parser.add_argument("--rounds", type=int, default=3)
    parser.add_argument("--max-tokens", type=int, default=64)
    args = parser.parse_args()
    settings = LocalSettings()
    threads = thread_count(settings)
    payload = json.dumps(
        [
            str(gguf.resolve_model_file(settings)),
            threads,
            args.max_tokens,
            list(PLAIN_STOP),
            [plain_prompt([Turn("user", p)]) for p in PROMPTS],
        ]
    )
    pythons = [sys.executable, *args.python]
    runs: dict[str, list[float]] = {p: [] for p in pythons}
    info: dict[str, str] = {}
    for _ in range(args.rounds):
        for python in pythons:
            result = measure(python, payload)
            runs[python].append(float(str(result["tokens_per_s"])))
            info[python] = str(result["system_info"])
    print(
        f"prompts={len(PROMPTS)} max_tokens={args.max_tokens} threads={threads} "
        f"rounds={args.rounds} (alternated)"
    )
    for python in pythons:
        each = "  ".join(f"{r:.1f}" for r in runs[python])
        print(
            f"{statistics.median(runs[python]):7.1f} tokens/s (median; rounds {each})  "
            f"{python}  [{features(info[python])}]"
        )


if __name__ == "__main__":
    main()
