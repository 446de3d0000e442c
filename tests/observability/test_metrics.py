"""Metrics scraped after a known workload match it exactly, summed over 2 worker processes."""

from __future__ import annotations

import asyncio
from collections import defaultdict

import httpx
from prometheus_client.parser import text_string_to_metric_families

from flow_api.embedded import free_port
from flow_api.observability.metrics import OTHER, LabelPolicy
from flow_api.settings import MetricsSettings, Settings
from flow_api.testing import Simulator
from tests.support import Api, serving
from tests.support.processes import astop, env_for, flow_api, wait_for_workers

Samples = dict[str, dict[frozenset[tuple[str, str]], float]]


def parse(text: str) -> Samples:
    """Sample name -> labels -> value."""
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(text):
        for sample in family.samples:
            samples[sample.name][frozenset(sample.labels.items())] = sample.value
    return samples


def total(samples: Samples, name: str, **labels: str) -> float:
    """The sum of `name` over every series whose labels include `labels`."""
    wanted = set(labels.items())
    return sum(v for k, v in samples.get(name, {}).items() if wanted <= k)


async def scrape(url: str) -> Samples:
    async with httpx.AsyncClient() as client:
        answer = await client.get(url)
    assert answer.status_code == 200, answer.text
    assert answer.headers["content-type"].startswith("text/plain")
    return parse(answer.text)


def merged(*scrapes: Samples) -> Samples:
    out: Samples = defaultdict(dict)
    for samples in scrapes:
        for name, series in samples.items():
            for labels, value in series.items():
                out[name][labels] = out[name].get(labels, 0) + value
    return out


async def test_counts_match_a_known_workload_across_two_worker_processes(
    api: Api, settings: Settings, simulator: Simulator
) -> None:
    job = {"provider": "openai", "model": "gpt-sim", "tenant": "default"}
    before = await scrape(f"{api.client.base_url}/metrics")
    # Cancelled and expired jobs are decided when a worker takes them: submit them first.
    cancelled = [await api.submit(f"to cancel {i}") for i in range(3)]
    for job_id in cancelled:
        assert (await api.post(f"/api/ai/jobs/{job_id}/cancel")).status_code == 200
    expired = [await api.submit(f"too late {i}", startWithinMs=100) for i in range(2)]
    await asyncio.sleep(0.3)

    ports = [free_port(), free_port()]
    workers = [
        flow_api("worker", env=env_for(settings, FLOW_METRICS_WORKER_PORT=str(port)))
        for port in ports
    ]
    try:
        await wait_for_workers(settings, 2, timeout_s=90)  # imports take long on a busy host
        completed = await asyncio.gather(*(api.submit(f"question {i}") for i in range(30)))
        rejected = await asyncio.gather(*(api.submit(f"[[sim:bad{i}:400]] x") for i in range(5)))
        retried = await asyncio.gather(
            *(api.submit(f"[[sim:flaky{i}:500,ok]] y") for i in range(4))
        )
        limited = [await api.submit(f"[[sim:slow{i}:429,ok]] z") for i in range(2)]
        ended = {}
        for job_id in [*cancelled, *expired, *completed, *rejected, *retried, *limited]:
            ended[job_id] = (await api.wait(job_id, timeout_s=60))["status"]
        # The heartbeat sets the slot gauges every 2 s, from the worker's first beat on.
        await asyncio.sleep(0.1)
        scraped = [await scrape(f"http://127.0.0.1:{port}/metrics") for port in ports]
        after = await scrape(f"{api.client.base_url}/metrics")
    finally:
        outputs = [await astop(w) for w in workers]
    assert all(code == 0 for code, _ in outputs), outputs
    assert [ended[j] for j in cancelled] == ["cancelled"] * 3
    assert [ended[j] for j in expired] == ["expired"] * 2
    assert {ended[j] for j in [*completed, *retried, *limited]} == {"completed"}
    assert {ended[j] for j in rejected} == {"failed"}

    both = merged(*scraped)
    assert all(total(s, "flow_jobs_finished_total") > 0 for s in scraped), "both took work"
    finished = {
        outcome: total(both, "flow_jobs_finished_total", **job, outcome=outcome)
        for outcome in ("completed", "failed", "cancelled", "expired")
    }
    assert finished == {"completed": 36, "failed": 5, "cancelled": 3, "expired": 2}
    assert total(both, "flow_attempts_retried_total", code="provider_unavailable") == 4
    assert total(both, "flow_provider_rate_limited_total", provider="openai") == 2
    assert total(both, "flow_job_queue_seconds_count", provider="openai") == 46
    usages = [
        (await api.get(f"/api/ai/result/{j}")).json()["result"]["usage"]
        for j in [*completed, *retried, *limited]
    ]
    prompt_tokens = sum(u["promptTokens"] for u in usages)
    completion_tokens = sum(u["completionTokens"] for u in usages)
    assert total(both, "flow_tokens_total", **job, direction="prompt") == prompt_tokens
    assert total(both, "flow_tokens_total", **job, direction="completion") == completion_tokens
    assert total(both, "flow_provider_call_seconds_count", outcome="ok") == 36
    assert total(both, "flow_worker_slots") == 2 * settings.worker.concurrency
    assert total(both, "flow_worker_slots_live") == 2 * settings.worker.concurrency
    assert total(both, "flow_redis_errors_total") == 0

    submitted = total(after, "flow_jobs_submitted_total", **job) - total(
        before, "flow_jobs_submitted_total", **job
    )
    assert submitted == 46
    depth = {
        state: total(after, "flow_queue_jobs", state=state)
        for state in ("waiting", "delayed", "active", "completed", "failed")
    }
    assert depth == {"waiting": 0, "delayed": 0, "active": 0, "completed": 36, "failed": 10}


async def test_queue_depth_counts_waiting_jobs_at_scrape_time(api: Api) -> None:
    for i in range(3):
        await api.submit(f"nobody takes this {i}")
    samples = await scrape(f"{api.client.base_url}/metrics")
    assert total(samples, "flow_queue_jobs", state="waiting") == 3


def test_labels_stay_bounded() -> None:
    policy = LabelPolicy(tenants=["acme"], models=["openai/gpt-4o-mini"])
    assert policy.tenant("acme") == "acme"
    assert policy.tenant("default") == "default"
    assert policy.tenant("someone-else") == OTHER
    assert policy.model("openai", "gpt-4o-mini") == "gpt-4o-mini"
    assert policy.model("openai", "any-name-a-client-sends") == OTHER
    policy.any_model_of = frozenset({"azure"})  # an allow-list bounds the names already
    assert policy.model("azure", "my-deployment") == "my-deployment"


async def test_metrics_can_be_turned_off(settings: Settings) -> None:
    off = settings.model_copy(update={"metrics": MetricsSettings(enabled=False)})
    async with serving(off) as api:
        answer = await api.client.get("/metrics")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"]
