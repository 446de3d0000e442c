"""Real worker processes killed, stopped and recovered while the simulator counts provider calls.

Every scenario prints its figures (`pytest -s` shows them); the README's Reliability section
quotes them.
"""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Callable, Iterator
from typing import Any

import pytest

from flow_api.settings import Settings
from flow_api.testing import Simulator
from tests.support import Api
from tests.support.processes import astop, env_for, flow_api, wait_for_workers


@pytest.fixture
def fast_locks(settings: Settings) -> Iterator[Settings]:
    # Shorter locks so crash recovery happens within the test's time; production uses 30 s.
    # (3 s proved too short on a loaded 2-core machine: renewals lagged and healthy jobs were
    # taken for stalled — exactly the failure the lock settings must avoid.)
    # A copy: the running API shares `settings`, and these are the workers' settings alone.
    locked = settings.model_copy(deep=True)
    locked.worker.lock_duration_ms = 10_000
    locked.worker.stalled_interval_ms = 2000
    locked.worker.concurrency = 400
    locked.worker.job_timeout_s = 60
    yield locked


async def wait_until(predicate: Any, timeout_s: float, what: str) -> None:
    deadline = time.monotonic() + timeout_s
    while not predicate():
        assert time.monotonic() < deadline, f"timed out waiting for {what}"
        await asyncio.sleep(0.05)


def settled(count: Callable[[], int], quiet_s: float = 0.3) -> Callable[[], bool]:
    """A predicate that holds once `count()` has not changed for `quiet_s` seconds."""
    last = [count(), time.monotonic()]

    def check() -> bool:
        now, value = time.monotonic(), count()
        if value != last[0]:
            last[:] = [value, now]
        return now - last[1] >= quiet_s

    return check


async def statuses(api: Api, ids: list[str]) -> list[dict[str, Any]]:
    return [(await api.client.get(f"/api/ai/status/{i}")).json() for i in ids]


async def test_sigkill_with_hundreds_in_flight_loses_nothing(
    api: Api, fast_locks: Settings, simulator: Simulator
) -> None:
    simulator.config.latency_s = 4.0
    total = 300
    ids = list(
        await asyncio.gather(*(api.submit(f"[[sim:c{i}:ok]] crash {i}") for i in range(total)))
    )
    doomed = flow_api("worker", env=env_for(fast_locks))
    try:
        await wait_until(lambda: simulator.stats.in_flight >= 200, 30, "calls in flight")
        # The simulator runs on this event loop: nothing it answers changes between this line
        # and the signal.
        answered_before_kill = simulator.stats.requests - simulator.stats.in_flight
        doomed.send_signal(signal.SIGKILL)
        doomed.wait(10)
    finally:
        if doomed.poll() is None:
            doomed.kill()
    # Calls in flight at the kill: every call the dead worker sent, less those answered before
    # it died. Requests it sent just before dying may still sit in the simulator's sockets:
    # count once this loop has read them all (the count stops moving).
    await wait_until(settled(lambda: simulator.stats.requests), 10, "the requests to arrive")
    in_flight_at_crash = simulator.stats.requests - answered_before_kill
    rescuer = flow_api("worker", env=env_for(fast_locks))
    try:
        for job_id in ids:
            assert (await api.wait(job_id, timeout_s=60))["status"] == "completed"
    finally:
        code, output = await astop(rescuer)
    assert code == 0, output
    calls = simulator.stats.by_key
    duplicated = sum(n - 1 for n in calls.values() if n > 1)
    assert set(calls) == {f"c{i}" for i in range(total)}
    assert duplicated <= in_flight_at_crash
    print(
        f"\nworker SIGKILL: submitted {total}, completed {total}, lost 0, "
        f"in flight at the crash {in_flight_at_crash}, provider calls run twice {duplicated}"
    )


async def test_a_slow_healthy_call_is_not_run_twice(
    api: Api, settings: Settings, simulator: Simulator
) -> None:
    # The call lasts more than three lock durations; the lock, renewed by BullMQ's default
    # (every lockDuration / 2, as in production), must keep it ours while a second worker's
    # stalled-job check runs every second.
    lock_s = 5
    workers_settings = settings.model_copy(deep=True)  # the running API keeps its own
    workers_settings.worker.lock_duration_ms = lock_s * 1000
    workers_settings.worker.stalled_interval_ms = 1000
    workers_settings.worker.job_timeout_s = 60  # also the SDK's HTTP timeout (tests: 5 s)
    workers = [flow_api("worker", env=env_for(workers_settings)) for _ in range(2)]
    try:
        await wait_for_workers(settings, 2, timeout_s=90)  # both run: both check for stalls
        prompt = f"[[sim:slow:hang@{3 * lock_s + 1}]] slow but fine"
        job_id = await api.submit(prompt, timeoutMs=60_000)
        status = await api.wait(job_id, timeout_s=60)
        record = await api.record(job_id)
    finally:
        outputs = [await astop(w) for w in workers]
    assert all(code == 0 for code, _ in outputs), outputs
    assert status["status"] == "completed", (status, record)
    assert status["attempts"] == 1, status
    assert len(record["attempts"]) == 1, record["attempts"]  # never taken for stalled
    assert simulator.stats.by_key["slow"] == 1
    run_s = record["timings"]["runMs"] / 1000
    assert run_s >= 3 * lock_s, f"the call lasted only {run_s:.1f} s"
    print(f"\nslow healthy call: {run_s:.1f} s with a {lock_s} s lock, run once")


async def sigterm_in_flight(
    api: Api, settings: Settings, simulator: Simulator, grace_s: int, prompts: list[str]
) -> tuple[list[str], str, float]:
    """A worker with `FLOW_WORKER_SHUTDOWN_GRACE_S=grace_s` gets SIGTERM once every prompt's
    call is in flight; the job ids, its output and how long it took to exit (code 0)."""
    worker = flow_api("worker", env=env_for(settings, FLOW_WORKER_SHUTDOWN_GRACE_S=str(grace_s)))
    try:
        # One call first: the budget lets a single probe call go to a model it knows nothing of
        # yet (the others wait for its answer, up to 2 s), so a cold burst is never all in flight.
        assert (await api.wait(await api.submit("warm up")))["status"] == "completed"
        ids = [await api.submit(prompt) for prompt in prompts]
        count = len(prompts)
        await wait_until(lambda: simulator.stats.in_flight == count, 20, f"{count} calls in flight")
    except BaseException:
        worker.kill()  # a failed test leaves no worker behind
        await astop(worker, interrupt=False)
        raise
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code, output = await astop(worker, timeout_s=grace_s + 14, interrupt=False)
    took = time.monotonic() - started
    assert code == 0, output
    return ids, output, took


async def test_sigterm_lets_in_flight_jobs_finish(
    api: Api, settings: Settings, simulator: Simulator
) -> None:
    prompts = [f"[[sim:t{i}:hang@2]] finish me" for i in range(20)]
    ids, output, took = await sigterm_in_flight(api, settings, simulator, 20, prompts)
    assert [s["status"] for s in await statuses(api, ids)] == ["completed"] * 20, output[-3000:]
    assert all(simulator.stats.by_key[f"t{i}"] == 1 for i in range(20))
    print(f"\nSIGTERM with 20 in flight: all completed, exit after {took:.2f} s")


async def test_sigterm_past_the_grace_period_hands_jobs_back(
    api: Api, settings: Settings, simulator: Simulator
) -> None:
    prompts = [f"[[sim:h{i}:hang@60,ok]] too slow" for i in range(10)]
    ids, _, took = await sigterm_in_flight(api, settings, simulator, 1, prompts)
    assert took < 5
    views = await statuses(api, ids)
    assert [v["status"] for v in views] == ["waiting"] * 10, "nothing may be left active"
    assert [v["attempts"] for v in views] == [0] * 10, "a hand-back must not burn an attempt"

    successor = flow_api("worker", env=env_for(settings, FLOW_WORKER_SHUTDOWN_GRACE_S="1"))
    try:
        for job_id in ids:
            assert (await api.wait(job_id, timeout_s=30))["status"] == "completed"
    finally:
        await astop(successor)
    print(f"\nSIGTERM past a 1 s grace: 10 handed back, exit after {took:.2f} s, all completed")


async def test_an_idle_worker_stops_fast(api: Api, settings: Settings) -> None:
    worker = flow_api("worker", env=env_for(settings))
    try:
        job_id = await api.submit("warm up")
        assert (await api.wait(job_id, timeout_s=60))["status"] == "completed"
        await wait_for_workers(settings, 1)  # idle, blocked in BullMQ's BZPOPMIN
    except BaseException:
        worker.kill()  # a failed test leaves no worker behind
        await astop(worker, interrupt=False)
        raise
    started = time.monotonic()
    worker.send_signal(signal.SIGTERM)
    code, output = await astop(worker, timeout_s=10, interrupt=False)
    took = time.monotonic() - started
    assert code == 0, output
    # The property: the stop does not sit out the blocking wait (up to 4 s, MAX_BLOCK_S) or
    # bullmq's drainDelay. A generous bound below that, not a timing figure (this machine is
    # shared); the figure is printed.
    assert took < 3.0, f"idle shutdown took {took:.2f} s"
    print(f"\nidle worker SIGTERM → exit in {took:.2f} s")


async def test_cancel_reaches_the_worker_process_holding_the_job(
    api: Api, settings: Settings, simulator: Simulator
) -> None:
    workers = [flow_api("worker", env=env_for(settings)) for _ in range(2)]
    try:
        await wait_for_workers(settings, 2)  # both up, so neither is stopped mid-start-up
        job_id = await api.submit("[[sim:cx:hang]] spend no more", timeoutMs=120_000)
        await wait_until(lambda: simulator.stats.in_flight == 1, 20, "the call to start")
        answer = await api.client.post(f"/api/ai/jobs/{job_id}/cancel")
        assert answer.status_code == 200
        await wait_until(lambda: simulator.stats.in_flight == 0, 5, "the call to be aborted")
        record = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
        for _ in range(50):
            if record["attempts"][-1].get("error"):
                break
            await asyncio.sleep(0.1)
            record = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
    finally:
        outputs = [await astop(w) for w in workers]
    assert all(code == 0 for code, _ in outputs), outputs
    assert record["status"] == "cancelled"
    assert record["attempts"][-1]["error"]["code"] == "cancelled"
    assert simulator.stats.by_key["cx"] == 1


async def test_a_job_that_keeps_crashing_its_worker_fails_after_max_stalled(
    api: Api, settings: Settings, simulator: Simulator
) -> None:
    # Every worker that takes this job dies (SIGKILL) while its call hangs. BullMQ's stalled
    # check hands it to the next worker FLOW_WORKER_MAX_STALLED times (3, the default), then
    # fails it instead of letting it take down workers forever.
    api_settings, settings = settings, settings.model_copy(deep=True)  # the API keeps its own
    settings.worker.lock_duration_ms = 2000
    settings.worker.stalled_interval_ms = 1000
    settings.worker.job_timeout_s = 60
    assert settings.worker.max_stalled == api_settings.worker.max_stalled == 3  # the default
    job_id = await api.submit("[[sim:stall:hang]] crashes every worker", timeoutMs=60_000)
    crashes = 0
    while True:
        # A new worker: its stalled check returns the job to the queue (or fails it), then it
        # takes the job and calls the provider, and dies in the call.
        worker = flow_api("worker", env=env_for(settings))
        try:
            deadline = time.monotonic() + 90
            while simulator.stats.by_key.get("stall", 0) == crashes:
                status = await api.status(job_id)
                if status["status"] == "failed":
                    break
                assert time.monotonic() < deadline, f"stuck after {crashes} crashes: {status}"
                await asyncio.sleep(0.1)
            else:
                worker.send_signal(signal.SIGKILL)
                crashes += 1
                assert crashes <= 6, "the job was never failed"
                continue
            break
        finally:
            if worker.poll() is None:
                worker.kill()
            worker.wait(10)
    record = await api.record(job_id)
    assert crashes == settings.worker.max_stalled + 1, (crashes, status)
    assert status["error"]["code"] == "worker_lost", status
    assert "more than 3 times" in status["error"]["message"], status
    print(f"\njob crashing its worker: failed after {crashes} crashes: {status['error']}")
    assert len(record["attempts"]) == crashes, record["attempts"]
