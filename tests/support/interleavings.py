"""A seeded, model-based driver of the whole stack under random interleavings (issue 12).

`Stack` runs the real thing: a Valkey server of its own (restarted at will), a `flow-api api`
process with authentication on, two or more `flow-api worker` processes (SIGKILLed and SIGTERMed
at will, and started again), and the provider simulator answering the OpenAI SDK, with faults
scripted per job. `Driver` takes seeded random steps against it — submits (with and without an
`Idempotency-Key`, reused keys, bursts of one key, keys with small token quotas), cancels at
random moments, waits, crashes, restarts, provider faults — and records what each answer
acknowledged in a `Model`, while a poller reads every job's status and checks each snapshot.
At the end, with the chaos stopped, every acknowledged job must reach its one terminal state and
the ledgers must add up. `Model.violations` lists what broke.

Why a seeded driver of our own and not Hypothesis' stateful testing: each example here is a run
of real processes lasting seconds to minutes, so shrinking (hundreds of re-runs) is out of reach,
and what makes a failure reproducible is the exact sequence of actions and waits, which a seed
replays (`FLOW_SOAK_SEED`). The processes' own timing still varies from run to run: a seed
replays the same schedule, not the same thread interleaving.
"""

from __future__ import annotations

import asyncio
import contextlib
import random
import signal
import subprocess
import time
from collections import Counter
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import orjson

from flow_api.auth.api_keys import ApiKeyStore
from flow_api.auth.principal import Scope
from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.heartbeat import read_heartbeats
from flow_api.keys import token_quota_key
from flow_api.queue.connection import REDIS_DOWN, connect
from flow_api.running import awaiting
from flow_api.settings import ApiSettings, AuthSettings, Settings, WorkerSettings
from flow_api.testing import Simulator, SimulatorConfig
from flow_api.testing.children import env_for, flow_api_command
from tests.support.settings import cloud_settings

SLOTS = 4
QUOTAS = {
    "acme-small": ("acme", 2500, 8),
    "acme-open": ("acme", 0, 0),
    "globex": ("globex", 1200, 4),
}
"""API keys the driver submits with: name -> (tenant, tokens per day, and that many more per
step of the run; 0 = no quota). Small: a run meets `quota_exhausted` often, not always."""
COMPLETION_ESTIMATE = 40
TERMINAL = frozenset({"completed", "failed", "cancelled", "expired"})
SCRIPTS = [  # (weight, the simulator's steps for a job's calls)
    (50, "ok"),
    (10, "500,ok"),
    (8, "429@0.1,ok"),
    (6, "hang@4,ok"),  # cut by the 2 s job timeout, then answered
    (6, "hang@0.6,ok"),
    (8, "reset,ok"),
    (5, "400"),
    (4, "500,500,500,500"),
    (3, "ok"),  # with startWithinMs, below
]
WORDS = ["alpha", "beta", "gamma", "delta", "epsilon", "zeta", "eta", "theta", "iota", "kappa"]
WORDS += ["lambda", "mu", "漢字", "émigré"]


def soak_settings(redis_url: str, sim_url: str) -> Settings:
    """Short locks, timeouts and backoff so crashes recover within a run; authentication on."""
    return cloud_settings(
        redis_url,
        sim_url,
        api=ApiSettings(port=free_port()),
        worker=WorkerSettings(
            concurrency=SLOTS,
            job_timeout_s=2,
            attempts=3,
            backoff_base_ms=50,
            backoff_max_ms=300,
            lock_duration_ms=5000,
            stalled_interval_ms=1000,
            shutdown_grace_s=1.0,
        ),
        auth=AuthSettings(
            enabled=True, requests_per_minute=0, estimate_completion_tokens=COMPLETION_ESTIMATE
        ),
    )


# --- what was acknowledged ----------------------------------------------------------------


@dataclass(slots=True)
class Job:
    """One job the API answered 202 for, and what the poller has seen of it."""

    id: str
    key: str
    tenant: str
    tag: str
    body: dict[str, Any]
    status: str = "waiting"
    created: str | None = None
    started: str | None = None
    finished: str | None = None
    final: dict[str, Any] | None = None
    ended: bool = False
    """BullMQ has finished the job (its record has `timings.finishedAt`): a job shown
    `cancelled` or `expired` while waiting ends there once a worker takes it."""


@dataclass
class Model:
    """What the API acknowledged, and every invariant check made against it."""

    jobs: dict[str, Job] = field(default_factory=dict)
    idempotent: dict[tuple[str, str], tuple[bytes, str]] = field(default_factory=dict)
    cancel_won: set[str] = field(default_factory=set)
    cancel_lost: set[str] = field(default_factory=set)
    cancel_unknown: set[str] = field(default_factory=set)
    answers: Counter[str] = field(default_factory=Counter)
    maybe_queued: Counter[str] = field(default_factory=Counter)
    """Tags of submits answered 503 or not at all: their job may exist and run all the same."""
    claimants: Counter[str] = field(default_factory=Counter)
    actions: Counter[str] = field(default_factory=Counter)
    checks: int = 0
    in_flight_at_disruptions: int = 0
    calls_at_disruptions: int = 0
    violations: list[str] = field(default_factory=list)

    def check(self, ok: bool, message: str) -> None:
        self.checks += 1
        if not ok:
            self.violations.append(message)

    def accepted(self, job: Job, tenant: str, idem: str | None, replayed: bool) -> None:
        known = self.jobs.get(job.id)
        if known is not None:
            self.check(known.body == job.body, f"{job.id}: one id for two bodies")
        else:
            self.jobs[job.id] = job
        if not replayed:  # (a replay's answer may arrive before its claimant's)
            self.claimants[job.id] += 1
            self.check(self.claimants[job.id] == 1, f"{job.id}: a second 202 without a replay")
        if idem is None:
            return
        fingerprint = orjson.dumps(job.body, option=orjson.OPT_SORT_KEYS)
        first = self.idempotent.setdefault((tenant, idem), (fingerprint, job.id))
        self.check(
            first == (fingerprint, job.id),
            f"Idempotency-Key {idem!r}: 202 for {job.id}, earlier {first[1]} (same body: "
            f"{first[0] == fingerprint})",
        )


# --- the processes ------------------------------------------------------------------------


class Stack:
    """Valkey, the API and the workers as processes; the simulator on this event loop."""

    def __init__(self, root: Path, workers: int = 2) -> None:
        self.root = root
        self.valkey = EmbeddedValkey(root / "valkey", appendfsync="always")
        self.simulator = Simulator(SimulatorConfig(latency_s=0.1, retry_after_s=0.1))
        self.worker_count = workers
        self.settings: Settings | None = None
        self.api: subprocess.Popen[bytes] | None = None
        self.workers: list[subprocess.Popen[bytes]] = []
        self.born: dict[int, float] = {}
        self.serving: set[int] = set()
        self.stopping: set[int] = set()
        self.exits: list[tuple[int, int, str]] = []  # pid, code, why
        self.valkey_up_since = 0.0
        self._logs = 0

    @property
    def base(self) -> str:
        assert self.settings is not None
        return f"http://127.0.0.1:{self.settings.api.port}"

    def _spawn(self, *args: str) -> subprocess.Popen[bytes]:
        assert self.settings is not None
        self._logs += 1
        out = (self.root / f"{args[0]}-{self._logs}.log").open("wb")
        with out:  # the child holds its own copy: a pipe nobody reads would block it
            process = subprocess.Popen(
                flow_api_command(*args),
                env=env_for(self.settings, inherit=True),  # (not the driver's FLOW_SOAK_*)
                stdout=out,
                stderr=subprocess.STDOUT,
            )
        self.born[process.pid] = time.monotonic()
        return process

    async def start(self) -> None:
        await self.valkey.astart()
        self.valkey_up_since = time.monotonic()
        await self.simulator.start()
        self.settings = soak_settings(self.valkey.url, self.simulator.url)
        self.api = self._spawn("api")
        async with httpx.AsyncClient(base_url=self.base) as client:
            for _ in range(300):
                with contextlib.suppress(httpx.TransportError):
                    if (await client.get("/healthz")).status_code == 200:
                        break
                assert self.api.poll() is None, "the API process exited during start-up"
                await asyncio.sleep(0.1)
        self.workers = [self._spawn("worker") for _ in range(self.worker_count)]

    async def make_keys(self, steps: int) -> dict[str, tuple[str, str, str, int]]:
        """name -> (tenant, key, key id, quota)."""
        assert self.settings is not None
        redis = connect(self.settings.redis)
        store = ApiKeyStore(redis, self.settings.redis.queue_name)
        keys = {}
        try:
            for name, (tenant, base, per_step) in QUOTAS.items():
                quota = base + per_step * steps
                record, key = await store.create(
                    tenant, name, frozenset({Scope.SUBMIT, Scope.READ}), tokens_per_day=quota
                )
                keys[name] = (tenant, key, record.id, quota)
        finally:
            await redis.aclose()
        return keys

    def live_workers(self) -> list[subprocess.Popen[bytes]]:
        return [w for w in self.workers if w.poll() is None and w.pid not in self.stopping]

    def serving_workers(self) -> list[subprocess.Popen[bytes]]:
        """Live workers that have reported every slot live at least once (start-up can take
        many seconds on a loaded machine: imports, providers)."""
        return [w for w in self.live_workers() if w.pid in self.serving]

    def kill_worker(self, pick: float) -> None:
        live = self.live_workers()
        if not live:
            return
        victim = live[int(pick * len(live))]
        victim.send_signal(signal.SIGKILL)
        victim.wait(10)
        self.exits.append((victim.pid, victim.returncode, "SIGKILL"))
        self.workers.remove(victim)
        self.workers.append(self._spawn("worker"))

    async def term_worker(self, pick: float) -> tuple[int, int]:
        """SIGTERM one serving worker, start its successor at once; (pid, exit code) once it
        exits. (A SIGTERM before a worker has set up its handlers ends it as the signal's
        default does; that is not what this checks.)"""
        live = self.serving_workers()
        if not live:
            return (0, 0)
        victim = live[int(pick * len(live))]
        self.stopping.add(victim.pid)
        victim.send_signal(signal.SIGTERM)
        self.workers.append(self._spawn("worker"))
        try:
            code = await asyncio.to_thread(victim.wait, 20)
        except subprocess.TimeoutExpired:
            victim.kill()
            code = 999
        self.exits.append((victim.pid, code, "SIGTERM"))
        self.workers.remove(victim)
        return victim.pid, code

    async def restart_valkey(self, kill: bool, down_s: float) -> None:
        if kill:
            self.valkey.kill()
        else:
            await asyncio.to_thread(self.valkey.stop)
        await asyncio.sleep(down_s)
        await self.valkey.astart()
        self.valkey_up_since = time.monotonic()

    def unexpected_exits(self) -> list[str]:
        found = []
        for process in [self.api, *self.workers]:
            exited = process is not None and process.poll() is not None
            if process is not None and exited and process.pid not in self.stopping:
                found.append(f"pid {process.pid} exited by itself with {process.returncode}")
        return found

    async def stop(self) -> list[tuple[int, int]]:
        """SIGINT every worker, then the API; their exit codes."""
        codes = []
        for process in [*self.workers, self.api]:
            if process is None:
                continue
            self.stopping.add(process.pid)
            if process.poll() is None:
                process.send_signal(signal.SIGINT)
        for process in [*self.workers, self.api]:
            if process is None:
                continue
            try:
                codes.append((process.pid, await asyncio.to_thread(process.wait, 30)))
            except subprocess.TimeoutExpired:
                process.kill()
                codes.append((process.pid, 999))
        await self.simulator.stop()
        await asyncio.to_thread(self.valkey.stop)
        return codes

    async def abort(self) -> None:
        """Kill every process of the stack at once."""
        for process in [*self.workers, self.api]:
            if process is not None and process.poll() is None:
                process.kill()
                process.wait()
        await self.simulator.stop()
        self.valkey.kill()

    def worker_logs(self) -> str:
        return "\n".join(p.read_text(errors="replace") for p in self.root.glob("worker-*.log"))


async def _end(task: asyncio.Task[Any], wait_s: float = 5) -> None:
    """Cancel a helper task and wait for it, but not forever: a cancel swallowed somewhere
    below it (seen once: the health check went on sleeping, and the run stalled waiting for
    it) is printed with where the task waits, and the run goes on."""
    task.cancel()
    done, _ = await asyncio.wait({task}, timeout=wait_s)
    if not done:
        print(f"task {task.get_name()} ignored its cancel; waits at {awaiting(task)}", flush=True)
        return
    with contextlib.suppress(asyncio.CancelledError):
        await task


# --- the driver ---------------------------------------------------------------------------


class Driver:
    """Seeded random steps against a `Stack`, answers recorded in a `Model`."""

    def __init__(self, stack: Stack, seed: int, steps: int) -> None:
        self.stack = stack
        self.seed = seed
        self.steps = steps
        self.rng = random.Random(seed)
        self.model = Model()
        self.keys: dict[str, tuple[str, str, str, int]] = {}
        self.client: httpx.AsyncClient | None = None
        self.pending: set[asyncio.Task[None]] = set()
        self.idem_keys: list[tuple[str, str, dict[str, Any]]] = []  # (key name, idem, body)
        self.n = 0
        self.heartbeat_checks = 0
        self.polls = 0
        self.progress = time.monotonic()

    def headers(self, name: str) -> dict[str, str]:
        return {"Authorization": f"Bearer {self.keys[name][1]}"}

    async def run(self) -> Model:
        stack = self.stack
        watchdog = asyncio.create_task(self._watch(asyncio.current_task()))
        try:
            await stack.start()
            self.keys = await stack.make_keys(self.steps)
            async with httpx.AsyncClient(base_url=stack.base, timeout=30) as client:
                self.client = client
                poller = asyncio.create_task(self._poll_forever())
                try:
                    for _ in range(self.steps):
                        await self._step()
                    await asyncio.gather(*self.pending)
                    await self._settle_down()
                finally:
                    await _end(poller)
                await self._final_checks()
        except BaseException:
            await stack.abort()  # a failing run leaves no process behind
            raise
        finally:
            watchdog.cancel()
        for pid, code in await stack.stop():
            self.model.check(code == 0, f"process {pid} stopped with exit code {code}")
        self.model.check(
            "slot ended unexpectedly" not in stack.worker_logs(), "a worker slot ended"
        )
        return self.model

    async def _watch(self, main: asyncio.Task[Any] | None, stall_s: float = 150) -> None:
        """A run that makes no progress for `stall_s` is a finding too: print where every task
        waits, and end the run."""
        while True:
            await asyncio.sleep(5)
            if time.monotonic() - self.progress < stall_s:
                continue
            lines = [f"driver made no progress for {stall_s:.0f} s; tasks:"]
            for task in asyncio.all_tasks():
                lines.append(f"  {task.get_name()}: {awaiting(task)}")
            for line in lines:
                print(f"VIOLATION: stall | {line}", flush=True)
            self.model.violations.append("\n".join(lines))
            if main is not None:
                main.cancel()
            return

    # --- steps ----------------------------------------------------------------------------

    async def _step(self) -> None:
        """One step. Every random choice is drawn here, before anything is awaited, so a seed
        replays the same schedule whatever the processes' timing (choices that need the
        stack's state draw a number and apply it to that state)."""
        self.progress = time.monotonic()
        rng = self.rng
        roll = rng.random()
        for problem in self.stack.unexpected_exits():
            self.model.check(False, problem)
        if roll < 0.42:
            self._spawn(self._post(*self._submission()))
        elif roll < 0.50:
            self.model.actions["idempotent burst"] += 1
            name, body, _ = self._submission()
            idem = f"b{self.n}"
            self.idem_keys.append((name, idem, body))
            copies = rng.randint(2, 6)
            self._spawn(asyncio.gather(*(self._post(name, body, idem) for _ in range(copies))))
        elif roll < 0.64:
            self.model.actions["cancel"] += 1
            target, delay, method = (
                rng.random(),
                rng.uniform(0, 0.2),
                rng.choice(["POST", "DELETE"]),
            )
            self._spawn(self._cancel(target, rng.random() < 0.8, delay, method))
        elif roll < 0.90:  # (then SIGKILL 4 %, SIGTERM 4.5 %, Valkey restart 1.5 %)
            self.model.actions["wait"] += 1
            await asyncio.sleep(rng.uniform(0, 0.3))
        elif roll < 0.94:
            self.model.actions["worker SIGKILL"] += 1
            await self._until_serving()
            await self._disrupting()
            self.stack.kill_worker(rng.random())
        elif roll < 0.985:
            self.model.actions["worker SIGTERM"] += 1
            await self._until_serving()
            await self._disrupting()
            self._spawn(self._term(rng.random()))
        else:
            self.model.actions["Valkey restart"] += 1
            await self._disrupting()
            await self.stack.restart_valkey(rng.random() < 0.5, rng.uniform(0.3, 1.5))

    async def _until_serving(self, timeout_s: float = 30) -> None:
        """Wait until some worker serves: on a loaded machine a worker takes many seconds to
        start, and crashes drawn faster than that kill only workers still starting (seen: no
        provider call ever in flight at a crash), so no crash would ever cut a call."""
        deadline = time.monotonic() + timeout_s
        while not self.stack.serving_workers() and time.monotonic() < deadline:
            self.progress = time.monotonic()
            await asyncio.sleep(0.1)

    async def _disrupting(self) -> None:
        """Count what a crash or restart may make run twice (the bound checked): every job a
        worker holds right now (BullMQ's active list: calls in flight, and answers whose
        finish is still being written; the Valkey here syncs every write, `appendfsync
        always`, so a finished job stays finished). Also the provider calls in flight right
        now (the figure reported)."""
        self.model.calls_at_disruptions += self.stack.simulator.stats.in_flight
        stack = self.stack
        assert stack.settings is not None
        active = f"{stack.settings.redis.prefix}:{stack.settings.redis.queue_name}:active"
        redis = connect(stack.settings.redis)
        try:
            held = int(await redis.llen(active))
        except REDIS_DOWN:  # still restarting: nothing can be known, so bound by every job
            held = sum(1 for job in self.model.jobs.values() if job.status not in TERMINAL)
        finally:
            await redis.aclose()
        self.model.in_flight_at_disruptions += held

    def _spawn(self, work: Any) -> None:
        task = asyncio.ensure_future(work)
        self.pending.add(task)
        task.add_done_callback(self.pending.discard)

    async def _term(self, pick: float) -> None:
        pid, code = await self.stack.term_worker(pick)
        self.model.check(code == 0, f"worker {pid} exited {code} after SIGTERM")

    def _body(self) -> dict[str, Any]:
        rng = self.rng
        self.n += 1
        tag = f"j{self.seed % 100000}x{self.n}"
        weights, scripts = zip(*SCRIPTS, strict=True)
        index = rng.choices(range(len(scripts)), weights=weights)[0]
        words = " ".join(rng.choice(WORDS) for _ in range(rng.randint(1, 12)))
        options: dict[str, Any] = {}
        max_tokens = rng.choice([None, None, 5, 20, 200])
        if max_tokens is not None:
            options["maxTokens"] = max_tokens
        if index == len(scripts) - 1:
            options["startWithinMs"] = rng.choice([300, 1500, 5000])
        return {"prompt": f"[[sim:{tag}:{scripts[index]}]] {words}", "options": options}

    def _submission(self) -> tuple[str, dict[str, Any], str | None]:
        """A submit's key, body and `Idempotency-Key`: a new body, or a key used before (with
        its body, or another one)."""
        rng = self.rng
        self.model.actions["submit"] += 1
        name = rng.choice(list(self.keys))
        body = self._body()
        idem = None
        if self.idem_keys and rng.random() < 0.2:
            name, idem, earlier = self.idem_keys[rng.randrange(len(self.idem_keys))]
            body = body if rng.random() < 0.3 else earlier
        elif rng.random() < 0.3:
            idem = f"k{self.n}"
            self.idem_keys.append((name, idem, body))
        return name, body, idem

    async def _post(self, name: str, body: dict[str, Any], idem: str | None) -> None:
        assert self.client is not None
        headers = self.headers(name)
        if idem is not None:
            headers["Idempotency-Key"] = idem
        tenant = self.keys[name][0]
        try:
            answer = await self.client.post("/api/ai/generate", json=body, headers=headers)
        except httpx.TransportError as exc:
            self.model.answers[f"submit {type(exc).__name__}"] += 1
            self.model.maybe_queued[body["prompt"].split(":")[1]] += 1
            return
        code = answer.status_code
        if code == 503:  # the enqueue's reply may be what was lost: the job may run
            self.model.maybe_queued[body["prompt"].split(":")[1]] += 1
        error = answer.json().get("error", {}).get("code") if code != 202 else None
        self.model.answers[f"submit {code} {error or ''}".strip()] += 1
        if code == 202:
            replayed = answer.headers.get("idempotent-replayed") == "true"
            tag = body["prompt"].split(":")[1]
            job = Job(answer.json()["jobId"], name, tenant, tag, body)
            self.model.accepted(job, tenant, idem, replayed)
            return
        if code == 409 and error == "idempotency_key_reused":
            fingerprint = orjson.dumps(body, option=orjson.OPT_SORT_KEYS)
            first = self.model.idempotent.get((tenant, idem or ""))
            self.model.check(
                first is None or first[0] != fingerprint,
                f"Idempotency-Key {idem!r}: 409 reused for the body that created {first}",
            )
            return
        allowed = {
            (429, "quota_exhausted"),
            (503, "queue_unavailable"),
            (409, "idempotency_key_in_progress"),
        }
        self.model.check((code, error) in allowed, f"submit answered {code}: {answer.text}")

    async def _cancel(self, target: float, open_only: bool, delay: float, method: str) -> None:
        assert self.client is not None
        await asyncio.sleep(delay)
        jobs = list(self.model.jobs.values())
        open_ = [j for j in jobs if j.status not in TERMINAL]
        pool = open_ if open_ and open_only else jobs
        if not pool:
            return
        job = pool[int(target * len(pool))]
        path = f"/api/ai/jobs/{job.id}"
        try:
            if method == "POST":
                answer = await self.client.post(f"{path}/cancel", headers=self.headers(job.key))
            else:
                answer = await self.client.delete(path, headers=self.headers(job.key))
        except httpx.TransportError:
            self.model.cancel_unknown.add(job.id)
            return
        code = answer.status_code
        self.model.answers[f"cancel {code}"] += 1
        if code == 200:
            status = answer.json()["status"]
            self.model.check(status == "cancelled", f"cancel 200 with status {status}")
            self.model.cancel_won.add(job.id)
        elif code == 409:
            error = answer.json()["error"]["code"]
            self.model.check(error == "job_already_finished", f"cancel 409 {error}")
            self.model.cancel_lost.add(job.id)
        elif code == 503:
            self.model.cancel_unknown.add(job.id)  # it may have been flagged
        else:
            self.model.check(False, f"cancel of {job.id} answered {code}: {answer.text}")

    # --- the poller: every snapshot is checked ----------------------------------------------

    async def _poll_forever(self) -> None:
        health = asyncio.create_task(self._check_health_forever())
        try:
            while True:
                await self._poll_once()
                await asyncio.sleep(0.1)
                self.polls += 1
        finally:
            await _end(health)

    async def _check_health_forever(self) -> None:
        """Workers' live slots and the keys' ledgers, twice a second."""
        while True:
            await self._check_heartbeats()
            await self._check_ledgers(final=False)
            await asyncio.sleep(0.5)

    async def _poll_once(self) -> None:
        assert self.client is not None
        open_ = [j for j in self.model.jobs.values() if j.final is None]
        for job in open_[:200]:
            try:
                answer = await self.client.get(
                    f"/api/ai/status/{job.id}", headers=self.headers(job.key)
                )
            except httpx.TransportError:
                continue
            if answer.status_code == 503:
                continue
            self.model.check(answer.status_code == 200, f"{job.id}: status {answer.text}")
            if answer.status_code == 200:
                self._observe(job, answer.json())

    def _observe(self, job: Job, view: dict[str, Any]) -> None:
        """One status snapshot: its own consistency (issue 21) and its place in the job's
        history (no terminal state left, no timestamp going back)."""
        check, status = self.model.check, view["status"]
        where = f"{job.id} ({job.tag})"
        if status == "completed":
            check(view.get("attempts", 0) >= 1, f"{where}: completed with 0 attempts")
        if status in ("failed", "cancelled", "expired"):
            check(view.get("error") is not None, f"{where}: {status} without an error")
        if status == "active":
            check(view.get("startedAt") is not None, f"{where}: active without startedAt")
        if status in TERMINAL:
            check(view.get("finishedAt") is not None, f"{where}: {status} without finishedAt")
        if job.status in TERMINAL:
            check(status == job.status, f"{where}: left {job.status} for {status}")
        if job.id in self.model.cancel_won:
            check(status != "completed", f"{where}: completed after a cancel answered 200")
        for name in ("createdAt", "startedAt", "finishedAt"):
            before, now = getattr(job, name.removesuffix("At")), view.get(name)
            if before is not None and now is not None:
                check(_at(now) >= _at(before), f"{where}: {name} went back {before} -> {now}")
        job.created = view.get("createdAt") or job.created
        job.started = view.get("startedAt") or job.started
        job.finished = view.get("finishedAt") or job.finished
        job.status = status

    async def _check_heartbeats(self) -> None:
        """Every worker that has been up a while reports all its slots live."""
        stack = self.stack
        assert stack.settings is not None
        now = time.monotonic()
        if now - stack.valkey_up_since < 12:
            return  # heartbeats written while Valkey was down are missing for a while
        redis = connect(stack.settings.redis)
        try:
            beats = await read_heartbeats(redis, stack.settings.redis.queue_name)
        except Exception:
            return
        finally:
            await redis.aclose()
        for worker in stack.live_workers():
            beat = next((b for b in beats if b.pid == worker.pid), None)
            if worker.pid not in stack.serving:
                if beat is not None and beat.live_slots == beat.slots:
                    stack.serving.add(worker.pid)
                continue
            self.heartbeat_checks += 1
            self.model.check(beat is not None, f"worker {worker.pid}: no heartbeat")
            if beat is not None:
                self.model.check(
                    beat.live_slots == beat.slots == SLOTS,
                    f"worker {worker.pid}: {beat.live_slots} of {beat.slots} slots live",
                )

    async def _check_ledgers(self, *, final: bool) -> dict[str, int]:
        stack = self.stack
        assert stack.settings is not None
        redis = connect(stack.settings.redis)
        window = int(time.time() // stack.settings.auth.quota_window_s)
        ledgers = {}
        try:
            for name, (_, _, key_id, quota) in self.keys.items():
                if quota <= 0:
                    continue
                key = token_quota_key(stack.settings.redis.queue_name, key_id, window)
                try:
                    ledgers[name] = int(await redis.get(key) or 0)
                except Exception:
                    if final:
                        raise
                    continue
                self.model.check(
                    ledgers[name] <= quota, f"key {name}: {ledgers[name]} tokens of {quota}"
                )
        finally:
            await redis.aclose()
        return ledgers

    # --- the end --------------------------------------------------------------------------

    async def _settle_down(self, timeout_s: float = 150) -> None:
        """No more chaos: wait until every acknowledged job has ended in BullMQ too."""
        assert self.client is not None
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            self.progress = time.monotonic()
            left = [j for j in self.model.jobs.values() if not j.ended]
            if not left:
                return
            for job in left:
                with contextlib.suppress(httpx.TransportError):
                    answer = await self.client.get(
                        f"/api/ai/jobs/{job.id}", headers=self.headers(job.key)
                    )
                    if answer.status_code == 200:
                        job.ended = answer.json()["timings"].get("finishedAt") is not None
            await asyncio.sleep(0.5)
        jobs = self.model.jobs.values()
        stuck = [(j.id, j.tag, j.status) for j in jobs if not j.ended]
        self.model.check(False, f"{len(stuck)} jobs never ended: {stuck[:10]}")

    async def _final_checks(self) -> None:
        assert self.client is not None
        model, check = self.model, self.model.check
        usage: Counter[str] = Counter()
        for job in model.jobs.values():
            self.progress = time.monotonic()
            headers = self.headers(job.key)
            view = await self.client.get(f"/api/ai/status/{job.id}", headers=headers)
            check(view.status_code == 200, f"{job.id}: acknowledged, then {view.status_code}")
            if view.status_code != 200:
                continue
            self._observe(job, view.json())
            job.final = view.json()
            result = await self.client.get(f"/api/ai/result/{job.id}", headers=headers)
            if job.status == "completed":
                check(result.status_code == 200, f"{job.id}: completed without a result")
                if result.status_code == 200:
                    usage[job.key] += result.json()["result"]["usage"]["totalTokens"]
            else:
                check(result.status_code == 409, f"{job.id}: {job.status}, result {result.text}")
            if job.id in model.cancel_won:
                check(job.status == "cancelled", f"{job.id}: cancel won, then {job.status}")
                if result.status_code == 409:
                    code = result.json()["error"]["code"]
                    check(code == "job_cancelled", f"{job.id}: cancelled, result {code}")
            elif job.id in model.cancel_lost and job.id not in model.cancel_unknown:
                check(job.status != "cancelled", f"{job.id}: cancel answered 409, yet cancelled")
        ledgers = await self._check_ledgers(final=True)
        for name, tokens in ledgers.items():
            # A submit answered 503 may have queued its job after all (the answer to the
            # enqueue was lost): that job runs, and its key is charged what it used.
            usage[name] += await self._unacknowledged_usage(name)
            why = "" if tokens == usage[name] else await self._explain_ledger(name)
            check(
                tokens == usage[name],
                f"key {name}: ledger {tokens}, usage of its completed jobs {usage[name]}; {why}",
            )
        answered = self.stack.simulator.stats.answered_by_key
        by_tag: dict[str, list[Job]] = {}
        for job in model.jobs.values():
            by_tag.setdefault(job.tag, []).append(job)
        twice, beyond, odd = 0, 0, []
        for tag, count in answered.items():
            jobs = by_tag.get(tag, [])
            # A tag names a body, and a body may make several jobs (a burst of another
            # Idempotency-Key reusing an earlier body, a submit answered 503 that queued its
            # job all the same): each of them may be answered once.
            extra = count - len(jobs) - model.maybe_queued[tag]
            if extra <= 0:
                continue
            twice += extra
            # An attempt cut by the job's timeout is retried while the provider goes on and
            # answers it ("hang@4,ok"): paid twice by the timeout's design, not by a crash.
            attempts = [a for job in jobs for a in await self._attempts(job)]
            timed_out = sum(1 for _, _, code in attempts if code == "provider_timeout")
            if extra > timed_out:
                beyond += extra - timed_out
                odd.append(f"{tag} ({len(jobs)} jobs) answered {count}: {attempts}")
        self.model.actions["provider answers paid twice"] = twice
        check(
            beyond <= model.in_flight_at_disruptions,
            f"{beyond} provider answers paid twice beyond the jobs' timeouts; "
            f"{model.in_flight_at_disruptions} jobs held by workers at crashes and restarts; "
            + "; ".join(odd[:4]),
        )

    async def _attempts(self, job: Job) -> list[tuple[Any, Any, Any]]:
        """(number, worker, error code) of each attempt in the job's record."""
        assert self.client is not None
        record = await self.client.get(f"/api/ai/jobs/{job.id}", headers=self.headers(job.key))
        return [
            (a.get("attempt"), a.get("worker"), (a.get("error") or {}).get("code"))
            for a in record.json().get("attempts", [])
        ]

    async def _settled(self, name: str) -> dict[str, str]:
        stack = self.stack
        assert stack.settings is not None
        key_id = self.keys[name][2]
        window = int(time.time() // stack.settings.auth.quota_window_s)
        queue = stack.settings.redis.queue_name
        redis = connect(stack.settings.redis)
        try:
            settled: dict[str, str] = await redis.hgetall(
                f"{token_quota_key(queue, key_id, window)}:jobs"
            )
        finally:
            await redis.aclose()
        return settled

    async def _unacknowledged_usage(self, name: str) -> int:
        """Tokens settled for jobs of this key that exist but were never answered 202."""
        assert self.client is not None
        total = 0
        for job_id, tokens in (await self._settled(name)).items():
            if job_id in self.model.jobs:
                continue
            exists = await self.client.get(f"/api/ai/status/{job_id}", headers=self.headers(name))
            if exists.status_code == 200:
                self.model.actions["jobs queued though their submit answered 503"] += 1
                total += int(tokens)
        return total

    async def _explain_ledger(self, name: str) -> str:
        """The jobs whose settle differs from what they used (for a ledger that does not add
        up)."""
        assert self.client is not None
        settled = await self._settled(name)
        odd = []
        for job in self.model.jobs.values():
            if job.key != name:
                continue
            used = 0
            if job.status == "completed":
                result = await self.client.get(
                    f"/api/ai/result/{job.id}", headers=self.headers(job.key)
                )
                used = result.json()["result"]["usage"]["totalTokens"]
            if settled.get(job.id) != str(used):
                odd.append(
                    f"{job.id} {job.tag} {job.status}: used {used}, settled {settled.get(job.id)}"
                )
        known = {j.id for j in self.model.jobs.values()}
        odd += [f"unknown job {i} settled {v}" for i, v in settled.items() if i not in known]
        return "; ".join(odd[:8])

    def report(self) -> str:
        model = self.model
        statuses = Counter(job.status for job in model.jobs.values())
        lines = [
            f"seed {self.seed}, {self.steps} steps, {model.checks} invariant checks "
            f"({self.heartbeat_checks} heartbeat), {len(model.violations)} violations",
            f"actions: {dict(model.actions)}",
            f"answers: {dict(model.answers)}",
            f"jobs: {len(model.jobs)} acknowledged, final {dict(statuses)}; cancels won "
            f"{len(model.cancel_won)}, lost {len(model.cancel_lost)}; at crashes and "
            f"restarts: {model.in_flight_at_disruptions} jobs held, "
            f"{model.calls_at_disruptions} provider calls in flight (at most "
            f"{self.stack.simulator.stats.max_in_flight} at once in the run)",
            f"replay: FLOW_SOAK_SEED={self.seed} FLOW_SOAK_STEPS={self.steps}",
        ]
        lines += [f"VIOLATION: {v}" for v in model.violations[:30]]
        return "\n".join(lines)


def _at(text: str) -> datetime:
    return datetime.fromisoformat(text.replace("Z", "+00:00"))
