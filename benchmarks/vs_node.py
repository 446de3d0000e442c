"""Flow API against the seed's Node reference (Express + BullMQ + LangChain JS), end to end.

Each stack is started fresh with the defaults a user gets, on the same throwaway valkey-server,
the same provider simulator (its own process, `--latency` per scenario) and the same load
generator (another process):

  node  `node dist/api.js` + one `node dist/worker.js` (WORKER_CONCURRENCY=C), from a built copy
        of the Node reference (its README: copy it somewhere writable, `npm ci`, `npx tsc -p .`);
        found at `--node-reference PATH`, else `$FLOW_BENCH_NODE_REFERENCE`, else
        `../shared/node-reference` beside the repository. Nothing of it lives in this repository.
  ours  `flow-api api` + one `flow-api worker` (FLOW_WORKER_CONCURRENCY=C), OpenAI provider on
        the simulator, every other setting at its default.

The load generator keeps `--clients` connections busy: each submits a job
(`POST /api/ai/generate`), then polls the status of one job it submitted earlier
(`GET /api/ai/status/{id}`), until the scenario's jobs are all submitted; then it polls the
unfinished ones. The clock starts when the generator, connected and ready, is told to go, and
stops when Redis counts every accepted job finished (BullMQ's completed and failed sets, which
both stacks keep). Then 20 results are read back over HTTP to check both answered the prompt.

Figures per run: e2e jobs/s (completed jobs over that time), submit latency p50/p99 (202
answers), CPU per job (user + system from /proc over the run, API and worker apart, each with
its child processes), peak RSS per process, and the valkey-server's CPU per job. Rounds alternate
which stack goes first, so drifting load on a shared machine hits both alike; the summary shows
each scenario's median and the ratios ours/node. Asserts nothing.

    python benchmarks/vs_node.py [--rounds 3] [--quick] [--scale 1] [--only 1,2,3]
        [--node-reference PATH] [--py-spy DIR]

Scenarios (the issue's): 1: worker concurrency 1000, 1 s calls, 4000 jobs; 2: concurrency 50,
instant calls, 2000 jobs; 3: concurrency 100, 200 ms calls, 2000 jobs. `--scale F` multiplies
the job counts (a loaded machine runs fewer); `--quick`: one round, half the jobs.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import os
import random
import statistics
import subprocess
import sys
import threading
import time
from collections.abc import Iterator, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import orjson
import psutil
from _harness import (
    PROVIDER_KEY,
    SIM_MODEL,
    Child,
    Profiler,
    machine,
    simulator,
    table,
    valkey_server,
)
from redis.asyncio import Redis

from flow_api.embedded import free_port

PREFIX = "bull"  # both stacks' BullMQ key prefix
REPO = Path(__file__).resolve().parent.parent
DEFAULT_NODE_REFERENCE = REPO.parent / "shared" / "node-reference"
FINISH_TIMEOUT_S = 300.0
RESULTS_CHECKED = 20


@dataclass(frozen=True)
class Scenario:
    """One of the issue's load shapes."""

    key: str
    concurrency: int
    latency_s: float
    jobs: int

    @property
    def label(self) -> str:
        call = f"{self.latency_s * 1000:.0f} ms calls" if self.latency_s else "instant calls"
        return f"{self.key}: concurrency {self.concurrency}, {call}, {self.jobs} jobs"


SCENARIOS = (
    Scenario("1", 1000, 1.0, 4000),
    Scenario("2", 50, 0.0, 2000),
    Scenario("3", 100, 0.2, 2000),
)


# --- the load generator (a child process) ---------------------------------------------------


async def load(url: str, clients: int, jobs: int) -> dict[str, Any]:
    """Submit `jobs` prompts over `clients` connections, polling as it goes (module docstring)."""
    import aiohttp

    latencies: list[float] = []  # of 202 answers only
    statuses: dict[str, int] = {}
    submitted: list[str] = []
    unfinished: set[str] = set()
    sent = polls = 0

    async def poll(session: aiohttp.ClientSession, job_id: str) -> None:
        nonlocal polls
        polls += 1
        async with session.get(f"{url}/api/ai/status/{job_id}") as answer:
            body = orjson.loads(await answer.read())
        if body.get("status") in ("completed", "failed", "cancelled", "expired"):
            unfinished.discard(job_id)

    async def submitter(session: aiohttp.ClientSession) -> None:
        nonlocal sent
        while sent < jobs:
            body = orjson.dumps({"prompt": f"Say something about job {sent}", "options": {}})
            sent += 1
            started = time.perf_counter()
            async with session.post(
                f"{url}/api/ai/generate", data=body, headers={"content-type": "application/json"}
            ) as answer:
                reply = orjson.loads(await answer.read())
            key = f"submit {answer.status}"
            statuses[key] = statuses.get(key, 0) + 1
            if answer.status == 202:
                latencies.append(time.perf_counter() - started)
                submitted.append(reply["jobId"])
                unfinished.add(reply["jobId"])
            await poll(session, random.choice(submitted or [reply.get("jobId", "none")]))

    async def tail(session: aiohttp.ClientSession) -> None:
        while unfinished:  # what is left, polled gently
            await poll(session, random.choice(tuple(unfinished)))
            await asyncio.sleep(0.05)

    connector = aiohttp.TCPConnector(limit=clients)
    async with aiohttp.ClientSession(connector=connector) as session:
        print("ready", flush=True)
        await asyncio.to_thread(sys.stdin.readline)
        await asyncio.gather(*(submitter(session) for _ in range(clients)))
        print(f"submitted {len(submitted)}", flush=True)
        await asyncio.gather(*(tail(session) for _ in range(clients)))
        # Check what both stacks answer: the simulator echoes the prompt.
        answers = []
        for job_id in submitted[:RESULTS_CHECKED]:
            async with session.get(f"{url}/api/ai/result/{job_id}") as answer:
                answers.append(orjson.loads(await answer.read()))
    latencies.sort()
    if not latencies:
        raise RuntimeError(f"no submit was accepted: {statuses}")
    # Node answers {"result": {"content"}}, ours {"result": {"text"}}.
    texts = [
        str(a.get("result", {}).get("content") or a.get("result", {}).get("text")) for a in answers
    ]
    good = sum(1 for text in texts if text.startswith("sim: "))
    return {
        "accepted": len(latencies),
        "requests": sum(statuses.values()) + polls,
        "p50": statistics.median(latencies),
        "p99": latencies[min(len(latencies) - 1, int(len(latencies) * 0.99))],
        "statuses": statuses,
        "results_ok": f"{good}/{len(answers)}",
    }


def run_load(args: argparse.Namespace) -> None:
    import uvloop

    result = uvloop.run(load(args.url, args.clients, args.jobs))
    print("result " + orjson.dumps(result).decode(), flush=True)


# --- meters ----------------------------------------------------------------------------------


class TreeMeter:
    """CPU seconds and peak RSS of a process and its descendants (sampled every 0.1 s; a
    supervisor's worker processes count with it). CPU is read at start and stop from /proc."""

    def __init__(self, pid: int) -> None:
        self.root = psutil.Process(pid)
        self.cpu_s = 0.0
        self.peak_rss = 0
        self._first: dict[int, float] = {}
        self._last: dict[int, float] = {}
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._sample, daemon=True)

    def _tree(self) -> list[psutil.Process]:
        with contextlib.suppress(psutil.Error):
            return [self.root, *self.root.children(recursive=True)]
        return []

    def _read(self) -> int:
        rss = 0
        for process in self._tree():
            with contextlib.suppress(psutil.Error):
                times = process.cpu_times()
                self._last[process.pid] = times.user + times.system
                self._first.setdefault(process.pid, 0.0)  # born during the run: all of it
                rss += process.memory_info().rss
        return rss

    def _sample(self) -> None:
        while not self._stop.wait(0.1):
            self.peak_rss = max(self.peak_rss, self._read())

    def start(self) -> None:
        self.peak_rss = self._read()
        self._first = dict(self._last)  # alive at the start: from here on
        self._thread.start()

    def stop(self) -> None:
        self._stop.set()
        self._thread.join()
        self._read()
        self.cpu_s = sum(self._last[pid] - self._first[pid] for pid in self._last)


# --- the stacks ------------------------------------------------------------------------------


@dataclass
class Stack:
    """An API process and a worker process of one implementation, started fresh for a run."""

    name: str
    api: Child
    worker: Child
    url: str
    queue_name: str
    extra: list[Child] = field(default_factory=list)

    def stop(self) -> None:
        for child in (self.api, self.worker, *self.extra):
            child.stop()


def _clean_env() -> dict[str, str]:
    return {
        k: v
        for k, v in os.environ.items()
        if not k.startswith(("FLOW_", "OPENAI_", "REDIS_", "WORKER_", "QUEUE_"))
    }


def start_node(reference: Path, redis_url: str, sim_url: str, scenario: Scenario) -> Stack:
    port = free_port()
    queue_name = f"node-{os.urandom(3).hex()}"
    env = _clean_env()
    env.update(
        PORT=str(port),
        HOST="127.0.0.1",
        REDIS_URL=redis_url,
        QUEUE_NAME=queue_name,
        OPENAI_BASE_URL=f"{sim_url}/v1",
        OPENAI_API_KEY=PROVIDER_KEY,
        OPENAI_MODEL=SIM_MODEL,
        WORKER_CONCURRENCY=str(scenario.concurrency),
        NODE_ENV="production",
    )
    api = Child(["node", str(reference / "dist" / "api.js")], env=env)
    worker = Child(["node", str(reference / "dist" / "worker.js")], env=env)
    stack = Stack("node", api, worker, f"http://127.0.0.1:{port}", queue_name)
    return _ready(stack, "listening on", "worker on queue")


def start_ours(redis_url: str, sim_url: str, scenario: Scenario) -> Stack:
    port = free_port()
    queue_name = f"ours-{os.urandom(3).hex()}"
    env = _clean_env()
    env.update(
        FLOW_REDIS_URL=redis_url,
        FLOW_REDIS_QUEUE_NAME=queue_name,
        FLOW_API_PORT=str(port),
        OPENAI_API_KEY=PROVIDER_KEY,
        OPENAI_BASE_URL=f"{sim_url}/v1",
        FLOW_OPENAI_MODEL=SIM_MODEL,
        FLOW_LOCAL_ENABLED="false",  # the simulator is the provider, as for the Node stack
        FLOW_WORKER_CONCURRENCY=str(scenario.concurrency),
    )
    flow = [sys.executable, "-m", "flow_api.cli"]
    api = Child([*flow, "api"], env=env)
    worker = Child([*flow, "worker"], env=env)
    stack = Stack("ours", api, worker, f"http://127.0.0.1:{port}", queue_name)
    return _ready(stack, "Application startup complete", "worker consuming queue")


def _ready(stack: Stack, api_says: str, worker_says: str) -> Stack:
    """`stack` once both processes said they are ready; stopped if either never does."""
    try:
        stack.api.wait_for(api_says)
        stack.worker.wait_for(worker_says)
    except BaseException:
        stack.stop()
        raise
    return stack


# --- one run ---------------------------------------------------------------------------------


@dataclass
class Run:
    """One stack's figures in one round of a scenario."""

    stack: str
    jobs_s: float
    p50_ms: float
    p99_ms: float
    api_cpu_ms: float  # per accepted submit
    api_cpu_request_ms: float  # per HTTP request (submits and polls)
    worker_cpu_ms: float  # per completed job
    valkey_cpu_ms: float  # per completed job
    api_rss_mib: float
    worker_rss_mib: float
    completed: int
    failed: int
    accepted: int
    results_ok: str
    statuses: dict[str, int]

    @property
    def cpu_ms(self) -> float:
        return self.api_cpu_ms * self.accepted / max(1, self.completed) + self.worker_cpu_ms


async def finished(redis: Redis, queue_name: str) -> tuple[int, int]:
    completed = await redis.zcard(f"{PREFIX}:{queue_name}:completed")
    failed = await redis.zcard(f"{PREFIX}:{queue_name}:failed")
    return int(completed), int(failed)


async def measure(
    stack: Stack,
    scenario: Scenario,
    redis: Redis,
    valkey_pid: int,
    clients: int,
    profile_dir: Path | None = None,
) -> Run:
    await asyncio.sleep(1.0)  # both stacks settle alike after saying they are ready
    loader = Child(
        [
            sys.executable,
            __file__,
            *("--child-url", stack.url, "--clients", str(clients), "--jobs", str(scenario.jobs)),
        ]
    )
    try:
        await asyncio.to_thread(loader.wait_for, "ready")
        pids = [stack.api.pid, stack.worker.pid] if stack.name == "ours" else []
        profiler = Profiler(pids, profile_dir, f"{stack.name}-{scenario.key}-{os.urandom(2).hex()}")
        profiler.start()
        api_meter, worker_meter = TreeMeter(stack.api.pid), TreeMeter(stack.worker.pid)
        valkey_meter = TreeMeter(valkey_pid)
        for meter in (api_meter, worker_meter, valkey_meter):
            meter.start()
        started = time.perf_counter()
        loader.send("go")
        line = await asyncio.to_thread(loader.wait_for, "submitted ", FINISH_TIMEOUT_S)
        accepted = int(line.split()[1])
        deadline = time.perf_counter() + FINISH_TIMEOUT_S
        completed = failed = 0
        while time.perf_counter() < deadline:
            completed, failed = await finished(redis, stack.queue_name)
            if completed + failed >= accepted:
                break
            await asyncio.sleep(0.02)
        took = time.perf_counter() - started
        for meter in (api_meter, worker_meter, valkey_meter):
            meter.stop()
        profiler.stop()
        line = await asyncio.to_thread(loader.wait_for, "result {", FINISH_TIMEOUT_S)
        result: dict[str, Any] = orjson.loads(line.strip().removeprefix("result "))
    finally:
        loader.stop()
    done = max(1, completed)
    return Run(
        stack=stack.name,
        jobs_s=completed / took,
        p50_ms=1000 * result["p50"],
        p99_ms=1000 * result["p99"],
        api_cpu_ms=1000 * api_meter.cpu_s / max(1, accepted),
        api_cpu_request_ms=1000 * api_meter.cpu_s / max(1, result["requests"]),
        worker_cpu_ms=1000 * worker_meter.cpu_s / done,
        valkey_cpu_ms=1000 * valkey_meter.cpu_s / done,
        api_rss_mib=api_meter.peak_rss / 2**20,
        worker_rss_mib=worker_meter.peak_rss / 2**20,
        completed=completed,
        failed=failed,
        accepted=accepted,
        results_ok=result["results_ok"],
        statuses=result["statuses"],
    )


# --- the parent ------------------------------------------------------------------------------


ROW_HEADER = [
    "scenario",
    "round",
    "stack",
    "jobs/s",
    "submit p50 ms",
    "submit p99 ms",
    "worker CPU ms/job",
    "API CPU ms/submit",
    "API CPU ms/request",
    "CPU ms/job (both)",
    "Valkey CPU ms/job",
    "RSS MiB api / worker",
    "completed / failed",
    "results ok",
]


def row(scenario: Scenario, round_no: int, run: Run) -> list[object]:
    return [
        scenario.key,
        round_no,
        run.stack,
        f"{run.jobs_s:.0f}",
        f"{run.p50_ms:.1f}",
        f"{run.p99_ms:.1f}",
        f"{run.worker_cpu_ms:.2f}",
        f"{run.api_cpu_ms:.2f}",
        f"{run.api_cpu_request_ms:.2f}",
        f"{run.cpu_ms:.2f}",
        f"{run.valkey_cpu_ms:.2f}",
        f"{run.api_rss_mib:.0f} / {run.worker_rss_mib:.0f}",
        f"{run.completed} / {run.failed}",
        run.results_ok,
    ]


def median(runs: Sequence[Run], attribute: str) -> float:
    return float(statistics.median(float(getattr(r, attribute)) for r in runs))


def summary(scenario: Scenario, node: Sequence[Run], ours: Sequence[Run]) -> list[list[object]]:
    """Median rows per stack and the ratio ours/node of each median."""
    rows: list[list[object]] = []
    fields = ("jobs_s", "p50_ms", "p99_ms", "worker_cpu_ms", "api_cpu_request_ms", "cpu_ms")
    fields = (*fields, "api_rss_mib", "worker_rss_mib")
    medians = {
        name: {f: median(runs, f) for f in fields}
        for name, runs in (("node", node), ("ours", ours))
    }
    for name in ("node", "ours"):
        m = medians[name]
        rows.append(
            [
                scenario.key,
                name,
                f"{m['jobs_s']:.0f}",
                f"{m['p50_ms']:.1f}",
                f"{m['p99_ms']:.1f}",
                f"{m['worker_cpu_ms']:.2f}",
                f"{m['api_cpu_request_ms']:.2f}",
                f"{m['cpu_ms']:.2f}",
                f"{m['api_rss_mib']:.0f} / {m['worker_rss_mib']:.0f}",
            ]
        )
    n, o = medians["node"], medians["ours"]
    rows.append(
        [
            scenario.key,
            "ours/node",
            _ratio(o["jobs_s"], n["jobs_s"]),
            _ratio(o["p50_ms"], n["p50_ms"]),
            _ratio(o["p99_ms"], n["p99_ms"]),
            _ratio(o["worker_cpu_ms"], n["worker_cpu_ms"]),
            _ratio(o["api_cpu_request_ms"], n["api_cpu_request_ms"]),
            _ratio(o["cpu_ms"], n["cpu_ms"]),
            f"{_ratio(o['api_rss_mib'], n['api_rss_mib'])} / "
            f"{_ratio(o['worker_rss_mib'], n['worker_rss_mib'])}",
        ]
    )
    return rows


def _ratio(value: float, base: float) -> str:
    return f"{value / base:.2f}x" if base else "n/a"


def goals(results: dict[str, tuple[list[Run], list[Run]]]) -> list[str]:
    """The issue's goals, judged on the medians."""
    lines = []
    for key, (node, ours) in results.items():
        r = median(ours, "jobs_s") / median(node, "jobs_s")
        lines.append(f"scenario {key}: jobs/s ours/node {r:.2f} (goal >= 1.20: {_met(r >= 1.2)})")
        p_ours, p_node = median(ours, "p99_ms"), median(node, "p99_ms")
        lines.append(
            f"scenario {key}: submit p99 ours {p_ours:.1f} ms, node {p_node:.1f} ms "
            f"(goal ours <= node: {_met(p_ours <= p_node)})"
        )
        # The API also answers the polls; a submit's own cost is judged per request.
        api = median(ours, "api_cpu_request_ms")
        lines.append(
            f"scenario {key}: API CPU per request (submit or poll) {api:.2f} ms "
            f"(goal per submit <= 1.0: {_met(api <= 1.0)})"
        )
    if "1" in results:
        worker = median(results["1"][1], "worker_cpu_ms")
        lines.append(
            f"scenario 1: worker CPU per job at 1000 in flight {worker:.2f} ms "
            f"(goal <= 2.0: {_met(worker <= 2.0)})"
        )
    return lines


def _met(ok: bool) -> str:
    return "met" if ok else "NOT met"


def node_reference(args: argparse.Namespace) -> Path:
    chosen = args.node_reference or os.environ.get("FLOW_BENCH_NODE_REFERENCE")
    path = Path(chosen) if chosen else DEFAULT_NODE_REFERENCE
    if not (path / "dist" / "api.js").is_file() or not (path / "node_modules").is_dir():
        raise SystemExit(
            f"no built Node reference at {path}: copy it somewhere writable, run `npm ci` and "
            "`npx tsc -p .` there (its README), then pass --node-reference PATH "
            "or set FLOW_BENCH_NODE_REFERENCE"
        )
    args.node_version = subprocess.run(
        ["node", "--version"], capture_output=True, text=True, check=True
    ).stdout.strip()
    return path


@contextlib.contextmanager
def started(stack: Stack) -> Iterator[Stack]:
    try:
        yield stack
    finally:
        stack.stop()


async def one_run(
    name: str,
    args: argparse.Namespace,
    scenario: Scenario,
    redis_url: str,
    sim_url: str,
    redis: Redis,
) -> Run:
    """Start `name`'s stack fresh, measure it, stop it."""
    if name == "node":
        stack = start_node(args.reference, redis_url, sim_url, scenario)
    else:
        stack = start_ours(redis_url, sim_url, scenario)
    with started(stack):
        return await measure(stack, scenario, redis, args.valkey_pid, args.clients, args.py_spy)


async def main(args: argparse.Namespace) -> None:
    reference = args.reference = node_reference(args)
    scenarios = [s for s in SCENARIOS if s.key in args.only.split(",")]
    if args.scale != 1:
        scenarios = [
            Scenario(s.key, s.concurrency, s.latency_s, max(1, round(s.jobs * args.scale)))
            for s in scenarios
        ]
    print(f"command: python benchmarks/vs_node.py {' '.join(sys.argv[1:])}")
    print(f"machine: {machine()}")
    print(f"node reference: {reference}; node {args.node_version}")
    print(
        f"load: {args.clients} clients submitting and polling from a separate process; "
        f"{args.rounds} alternated round(s) per scenario\n"
    )
    results: dict[str, tuple[list[Run], list[Run]]] = {}
    rows: list[list[object]] = []
    with valkey_server() as valkey:
        redis = Redis.from_url(valkey.url)
        assert valkey.process is not None
        args.valkey_pid = valkey.process.pid
        try:
            for scenario in scenarios:
                print(f"scenario {scenario.label}", flush=True)
                node_runs: list[Run] = []
                our_runs: list[Run] = []
                with simulator("--latency", str(scenario.latency_s)) as sim:
                    for round_no in range(1, args.rounds + 1):
                        order = ("node", "ours") if round_no % 2 else ("ours", "node")
                        for name in order:
                            run = await one_run(name, args, scenario, valkey.url, sim.url, redis)
                            (node_runs if name == "node" else our_runs).append(run)
                            rows.append(row(scenario, round_no, run))
                            print("  " + " ".join(str(c) for c in rows[-1]), flush=True)
                results[scenario.key] = (node_runs, our_runs)
        finally:
            await redis.aclose()
    print()
    print(table(ROW_HEADER, rows))
    print("\nMedians of the rounds, and ours/node:\n")
    header = [
        "scenario",
        "stack",
        "jobs/s",
        "submit p50 ms",
        "submit p99 ms",
        "worker CPU ms/job",
        "API CPU ms/request",
        "CPU ms/job (both)",
        "RSS MiB api / worker",
    ]
    summary_rows = [r for key, (n, o) in results.items() for r in summary(_scenario(key), n, o)]
    print(table(header, summary_rows))
    print()
    for line in goals(results):
        print(line)


def _scenario(key: str) -> Scenario:
    return next(s for s in SCENARIOS if s.key == key)


def parse(argv: Sequence[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--rounds", type=int, default=3, help="alternated rounds per scenario")
    parser.add_argument("--quick", action="store_true", help="one round, half the jobs")
    parser.add_argument(
        "--scale", type=float, default=1.0, help="multiply every scenario's job count"
    )
    parser.add_argument("--only", default="1,2,3", help="scenarios to run, e.g. 1,3")
    parser.add_argument("--clients", type=int, default=64, help="load generator connections")
    parser.add_argument("--node-reference", type=Path, help="a built copy of the Node reference")
    parser.add_argument(
        "--py-spy", type=Path, help="record our processes with py-spy (raw stacks) into this folder"
    )
    parser.add_argument("--child-url", dest="url", help=argparse.SUPPRESS)
    parser.add_argument("--jobs", type=int, default=0, help=argparse.SUPPRESS)
    args = parser.parse_args(argv)
    if args.quick:
        args.rounds, args.scale = 1, args.scale / 2
    return args


if __name__ == "__main__":
    parsed = parse()
    if parsed.url:
        run_load(parsed)
    else:
        asyncio.run(main(parsed))
