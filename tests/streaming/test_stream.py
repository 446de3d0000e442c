"""`GET /api/ai/stream/{jobId}` over real HTTP and Valkey, read with `httpx-sse`."""

from __future__ import annotations

import asyncio

import pytest

from flow_api.providers import ProviderRegistry
from flow_api.settings import Settings
from tests.streaming.support import Event, paced, read_stream, streamed_text
from tests.support import Api, WorkerFactory, serving
from tests.support.scripted import ScriptedProvider

PROMPT = "the quick brown fox jumps over the lazy dog " * 5


def kinds(events: list[Event]) -> list[str]:
    return [e.event for e in events]


async def test_a_stream_read_from_the_start_equals_the_final_text(
    api: Api, start_worker: WorkerFactory
) -> None:
    job_id = await api.submit(PROMPT)
    reading = asyncio.create_task(read_stream(api.client, job_id))  # before the worker runs
    await asyncio.sleep(0.2)
    await start_worker(registry=paced())
    events = await reading
    result = (await api.client.get(f"/api/ai/result/{job_id}")).json()
    assert events[0] == Event("0-0", "status", {"status": "waiting", "attempt": 0})
    assert events[1].event == "status" and events[1].data == {"status": "active", "attempt": 1}
    assert events[-1].event == "result"
    assert events[-1].data == result
    tokens = [e for e in events if e.event == "token"]
    assert len(tokens) > 1, "tokens arrive in more than one event"
    assert all(t.data["attempt"] == 1 for t in tokens)
    assert streamed_text(events) == result["result"]["text"] == f"echo: {PROMPT.strip()}"
    assert len({e.id for e in events}) == len(events)


async def watched_from_the_start(api: Api, start_worker: WorkerFactory, prompt: str) -> list[Event]:
    """Submit `prompt`, watch it, then start a worker: the whole stream, tokens streamed."""
    job_id = await api.submit(prompt)
    reading = asyncio.create_task(read_stream(api.client, job_id))
    await asyncio.sleep(0.2)  # the watcher is registered before the attempt starts
    await start_worker(registry=paced())
    return await reading


async def test_a_client_that_reconnects_gets_exactly_the_rest(
    api: Api, start_worker: WorkerFactory
) -> None:
    whole = await watched_from_the_start(api, start_worker, PROMPT)
    job_id = whole[-1].data["jobId"]
    assert len(whole) > 5
    for cut in range(1, len(whole)):
        first = await read_stream(api.client, job_id, stop_after=cut)
        rest = await read_stream(api.client, job_id, last_event_id=first[-1].id)
        assert first + rest == whole, f"cut after {cut} events"
    # After the final event there is nothing more: the stream closes at once.
    assert await read_stream(api.client, job_id, last_event_id=whole[-1].id) == []


async def test_a_job_nobody_watched_has_its_text_in_one_event(
    api: Api, start_worker: WorkerFactory
) -> None:
    await start_worker(registry=paced())
    job_id = await api.submit(PROMPT)
    assert (await api.wait(job_id))["status"] == "completed"
    events = await read_stream(api.client, job_id)
    assert kinds(events) == ["status", "status", "token", "result"]
    assert streamed_text(events) == events[-1].data["result"]["text"]


async def test_a_late_client_gets_every_event_of_a_finished_job_then_the_stream_closes(
    api: Api, start_worker: WorkerFactory
) -> None:
    await start_worker()
    job_id = await api.submit("hello stream")
    assert (await api.wait(job_id))["status"] == "completed"
    events = await asyncio.wait_for(read_stream(api.client, job_id), 5)
    assert kinds(events)[:2] == ["status", "status"]
    assert kinds(events)[-1] == "result"
    assert streamed_text(events) == "echo: hello stream"


async def test_streams_through_two_api_processes(
    api: Api, settings: Settings, start_worker: WorkerFactory
) -> None:
    from flow_api.embedded import free_port

    other_settings = settings.model_copy(
        update={"api": settings.api.model_copy(update={"port": free_port()})}
    )
    async with serving(other_settings) as other:
        whole = await watched_from_the_start(api, start_worker, PROMPT)
        job_id = whole[-1].data["jobId"]
        first = await read_stream(api.client, job_id, stop_after=3)
        rest = await read_stream(other.client, job_id, last_event_id=first[-1].id)
        assert first + rest == whole == await read_stream(other.client, job_id)
        assert rest[-1].event == "result"


async def test_a_retried_attempts_tokens_are_marked_and_a_failure_ends_with_its_error(
    api: Api, settings: Settings, start_worker: WorkerFactory
) -> None:
    from flow_api.errors import ProviderUnavailable

    provider = ScriptedProvider({"flaky": [ProviderUnavailable("down"), None]})
    await start_worker(settings, ProviderRegistry([provider]))
    job_id = await api.submit("flaky")
    events = await read_stream(api.client, job_id)
    statuses = [(e.data["status"], e.data["attempt"]) for e in events if e.event == "status"]
    assert statuses == [("waiting", 0), ("active", 1), ("retrying", 1), ("active", 2)]
    retry = next(e for e in events if e.data.get("status") == "retrying")
    assert retry.data["error"]["code"] == "provider_unavailable"
    assert events[-1].event == "result"
    assert streamed_text(events) == "ok 2"

    provider.model.scripts["broken"] = [ProviderUnavailable("down")]
    failed = await api.submit("broken")
    events = await read_stream(api.client, failed)
    assert events[-1].event == "error"
    assert events[-1].data == (await api.client.get(f"/api/ai/result/{failed}")).json()
    assert events[-1].data["error"]["code"] == "job_failed"


async def test_a_cancelled_waiting_job_ends_its_stream(api: Api) -> None:
    job_id = await api.submit("never run")
    reading = asyncio.create_task(read_stream(api.client, job_id))
    await asyncio.sleep(0.2)
    assert (await api.client.post(f"/api/ai/jobs/{job_id}/cancel")).status_code == 200
    events = await asyncio.wait_for(reading, 10)
    assert events[-1].event == "error"
    assert events[-1].data["error"]["code"] == "job_cancelled"


@pytest.mark.parametrize("value", ["abc", "1-", "-1", "1-2-3", "0-0 x", "1" * 30 + "-0"])
async def test_a_malformed_last_event_id_is_a_400(api: Api, value: str) -> None:
    job_id = await api.submit("x")
    answer = await api.client.get(f"/api/ai/stream/{job_id}", headers={"Last-Event-ID": value})
    assert answer.status_code == 400
    assert answer.json()["error"]["code"] == "invalid_last_event_id"
    assert answer.json()["error"]["field"] == "Last-Event-ID"


async def test_an_unknown_job_is_a_404(api: Api) -> None:
    for job_id in ("0" * 32, "not-an-id"):
        answer = await api.client.get(f"/api/ai/stream/{job_id}")
        assert answer.status_code == 404
        assert answer.json()["error"]["code"] == "job_not_found"


async def test_past_the_event_bound_the_rest_of_the_text_comes_as_one_event(
    api: Api, settings: Settings, start_worker: WorkerFactory
) -> None:
    from flow_api.settings import StreamSettings

    bounded = settings.model_copy(update={"stream": StreamSettings(max_events=10, flush_ms=1)})
    job_id = await api.submit(PROMPT)
    reading = asyncio.create_task(read_stream(api.client, job_id))
    await asyncio.sleep(0.2)
    await start_worker(bounded, paced())
    events = await reading
    tokens = [e for e in events if e.event == "token"]
    assert len(tokens) == 11, [t.data["text"] for t in tokens]  # 10, then the rest at the end
    assert len(tokens[-1].data["text"].split()) > 20
    assert streamed_text(events) == events[-1].data["result"]["text"]
