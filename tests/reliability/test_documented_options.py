"""Documented behaviour checked where it lands: request options as the provider receives them
(asserted at the simulator, through the official SDKs), and BullMQ priority order."""

from __future__ import annotations

from datetime import datetime
from typing import Any

import pytest

from flow_api.settings import Settings
from flow_api.testing import Simulator
from tests.support import Api, WorkerFactory

OPTIONS = {"stop": ["END", "\n\n"], "seed": 4242, "system": "Answer in French.", "temperature": 0}


def body_for(simulator: Simulator, marker: str) -> dict[str, Any]:
    """The one request body the simulator received whose messages mention `marker`."""
    found = [b for b in simulator.bodies if marker in str(b.get("messages"))]
    assert len(found) == 1, f"{len(found)} bodies mention {marker!r}"
    return found[0]


@pytest.mark.parametrize("provider", ["openai", "azure"])
async def test_stop_seed_and_system_reach_openai_style_providers(
    api: Api, worker: object, simulator: Simulator, provider: str
) -> None:
    marker = f"options via {provider}"
    job_id = await api.submit(marker, provider=provider, **OPTIONS)
    assert (await api.wait(job_id))["status"] == "completed"
    body = body_for(simulator, marker)
    assert body["stop"] == OPTIONS["stop"]
    assert body["seed"] == OPTIONS["seed"]
    assert body["temperature"] == 0
    assert body["messages"][0] == {"role": "system", "content": OPTIONS["system"]}
    assert body["messages"][-1]["role"] == "user"


async def test_stop_system_and_the_default_max_tokens_reach_anthropic(
    api: Api, worker: object, simulator: Simulator, settings: Settings
) -> None:
    marker = "options via anthropic"
    options = {k: v for k, v in OPTIONS.items() if k != "seed"}  # Anthropic has no seed
    job_id = await api.submit(marker, provider="anthropic", **options)
    assert (await api.wait(job_id))["status"] == "completed"
    body = body_for(simulator, marker)
    assert body["stop_sequences"] == OPTIONS["stop"]
    assert body["system"] == OPTIONS["system"]
    # Anthropic requires max_tokens: a request without maxTokens gets the documented default.
    assert body["max_tokens"] == settings.anthropic.default_max_tokens == 1024

    asked = "anthropic with maxTokens"
    job_id = await api.submit(asked, provider="anthropic", maxTokens=7)
    assert (await api.wait(job_id))["status"] == "completed"
    assert body_for(simulator, asked)["max_tokens"] == 7


async def test_priority_one_runs_first(
    api: Api, start_worker: WorkerFactory, settings: Settings
) -> None:
    # Queued before any worker runs; one slot, so the start order is the queue's order.
    one_slot = settings.model_copy(deep=True)  # the running API keeps its own settings
    one_slot.worker.concurrency = 1
    ranked = [(5, "low"), (1, "high"), (3, "middle"), (None, "none")]
    ids = {name: await api.submit(f"priority {name}", priority=p) for p, name in ranked}
    await start_worker(one_slot)
    started = {}
    for name, job_id in ids.items():
        assert (await api.wait(job_id))["status"] == "completed"
        record = await api.record(job_id)
        started[name] = datetime.fromisoformat(record["attempts"][0]["startedAt"])
    order = sorted(started, key=started.__getitem__)
    # BullMQ runs jobs without a priority before prioritized ones; among those, 1 is highest.
    assert order == ["none", "high", "middle", "low"], order
