"""`/v1/files` and `/v1/batches` through the official `openai` SDK pointed at a real API server,
with real workers answering from the loopback simulator (also through the SDK)."""

from __future__ import annotations

import asyncio
import io
from collections.abc import AsyncIterator
from typing import Any

import openai
import orjson
import pytest
from openai.types import Batch, FileObject
from openai.types.chat import ChatCompletion

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import BatchSettings, ProviderSettings, Settings
from flow_api.testing import Simulator
from tests.support import Api, WorkerFactory, make_settings, openai_on, serving
from tests.support.settings import SIM_MODEL


def line(custom_id: str, prompt: str, **body: Any) -> dict[str, Any]:
    return {
        "custom_id": custom_id,
        "method": "POST",
        "url": "/v1/chat/completions",
        "body": {"model": SIM_MODEL, "messages": [{"role": "user", "content": prompt}], **body},
    }


def jsonl(lines: list[dict[str, Any]]) -> bytes:
    return b"".join(orjson.dumps(item) + b"\n" for item in lines)


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator) -> Settings:
    return make_settings(
        valkey.url,
        provider=ProviderSettings(default="openai", fake_enabled=True),
        openai=openai_on(simulator.url),
        batch=BatchSettings(enqueue_chunk=7, max_lines=500, sweep_s=0.2),
    )


@pytest.fixture
async def sdk(api: Api) -> AsyncIterator[openai.AsyncOpenAI]:
    client = openai.AsyncOpenAI(
        base_url=f"http://127.0.0.1:{api.settings.api.port}/v1", api_key="unused", max_retries=0
    )
    yield client
    await client.close()


async def upload(sdk: openai.AsyncOpenAI, content: bytes) -> FileObject:
    return await sdk.files.create(file=("input.jsonl", io.BytesIO(content)), purpose="batch")


async def wait_for(sdk: openai.AsyncOpenAI, batch_id: str, *statuses: str) -> Batch:
    deadline = asyncio.get_running_loop().time() + 30
    while True:
        batch = await sdk.batches.retrieve(batch_id)
        if batch.status in statuses:
            return batch
        assert asyncio.get_running_loop().time() < deadline, f"batch stuck: {batch}"
        await asyncio.sleep(0.05)


async def read_lines(sdk: openai.AsyncOpenAI, file_id: str) -> list[dict[str, Any]]:
    content = await sdk.files.content(file_id)
    return [orjson.loads(raw) for raw in content.content.splitlines()]


async def test_a_batch_runs_every_line_and_answers_in_openai_shapes(
    api: Api, sdk: openai.AsyncOpenAI, start_worker: WorkerFactory
) -> None:
    await start_worker()
    lines = [line(f"req-{i}", f"question {i}", max_tokens=8) for i in range(30)]
    lines.append(line("via-fake", "hello", model="fake/any"))
    lines.append(line("refused", "[[sim:refused:400]] no"))
    uploaded = await upload(sdk, jsonl(lines))
    raw_file = (await api.get(f"/v1/files/{uploaded.id}")).json()
    FileObject.model_validate(raw_file)
    assert (raw_file["bytes"], raw_file["purpose"]) == (len(jsonl(lines)), "batch")

    created = await sdk.batches.create(
        input_file_id=uploaded.id,
        endpoint="/v1/chat/completions",
        completion_window="24h",
        metadata={"run": "nightly"},
    )
    assert created.status == "validating"
    done = await wait_for(sdk, created.id, "completed", "failed")
    Batch.model_validate((await api.get(f"/v1/batches/{created.id}")).json())
    assert done.status == "completed", done.errors
    assert done.request_counts is not None
    assert (done.request_counts.total, done.request_counts.completed) == (32, 31)
    assert done.request_counts.failed == 1
    assert done.metadata == {"run": "nightly"}
    assert done.created_at <= (done.in_progress_at or 0) <= (done.completed_at or 0)
    assert done.output_file_id and done.error_file_id

    output = await read_lines(sdk, done.output_file_id)
    assert [item["custom_id"] for item in output] == [f"req-{i}" for i in range(30)] + ["via-fake"]
    for item in output[:30]:
        assert item["response"]["status_code"] == 200 and item["error"] is None
        completion = ChatCompletion.model_validate(item["response"]["body"])
        number = item["custom_id"].removeprefix("req-")
        assert completion.choices[0].message.content == f"sim: question {number}"
    errors = await read_lines(sdk, done.error_file_id)
    assert [item["custom_id"] for item in errors] == ["refused"]
    assert errors[0]["response"]["status_code"] == 400
    assert errors[0]["response"]["body"]["error"]["code"] == "provider_rejected"

    listed = await sdk.batches.list(limit=5)
    assert [batch.id for batch in listed.data] == [created.id]


async def test_bad_lines_fail_the_batch_naming_each_line(sdk: openai.AsyncOpenAI) -> None:
    good = line("a", "fine")
    content = b"\n".join(
        [
            orjson.dumps(good),
            b"{not json",
            orjson.dumps({**good, "custom_id": None}),
            orjson.dumps(good),  # duplicate custom_id "a"
            orjson.dumps({**line("b", "x"), "url": "/v1/embeddings"}),
            orjson.dumps({**line("c", "x"), "method": "GET"}),
            orjson.dumps(line("d", "x", temperature=7)),
            orjson.dumps(line("e", "x", model="anthropic/claude")),  # not configured
            orjson.dumps(line("f", "x", tools=[])),
        ]
    )
    uploaded = await upload(sdk, content)
    created = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    failed = await wait_for(sdk, created.id, "failed", "completed")
    assert failed.status == "failed"
    assert failed.errors is not None and failed.errors.data is not None
    found = {(error.line, error.code) for error in failed.errors.data}
    assert found == {
        (2, "invalid_json"),
        (3, "missing_custom_id"),
        (4, "duplicate_custom_id"),
        (5, "invalid_url"),
        (6, "invalid_method"),
        (7, "invalid_request"),
        (8, "provider_not_configured"),
        (9, "unsupported_parameter"),
    }
    assert failed.failed_at is not None and failed.output_file_id is None


async def test_limits_and_bad_requests_answer_json(api: Api, sdk: openai.AsyncOpenAI) -> None:
    too_many = b"".join(orjson.dumps(line(f"n{i}", "x")) + b"\n" for i in range(501))
    with pytest.raises(openai.BadRequestError) as lines_over:
        await upload(sdk, too_many)
    assert lines_over.value.code == "invalid_batch_request"
    answer = await api.client.post(
        "/v1/files", files={"file": ("a.jsonl", b"{}\n")}, data={"purpose": "fine-tune"}
    )
    assert answer.status_code == 400 and answer.json()["error"]["field"] == "purpose"
    uploaded = await upload(sdk, jsonl([line("a", "x")]))
    with pytest.raises(openai.BadRequestError):
        await sdk.batches.create(
            input_file_id=uploaded.id,
            endpoint="/v1/embeddings",  # type: ignore[arg-type]
            completion_window="24h",
        )
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.retrieve("batch_0123456789abcdef01234567")
    with pytest.raises(openai.NotFoundError):
        await sdk.batches.create(
            input_file_id="file-nope", endpoint="/v1/chat/completions", completion_window="24h"
        )


async def test_a_file_over_the_size_limit_is_413(valkey: EmbeddedValkey) -> None:
    settings = make_settings(valkey.url, batch=BatchSettings(max_file_bytes=10_000))
    async with serving(settings) as api:
        big = jsonl([line(f"n{i}", "x" * 100) for i in range(200)])
        answer = await api.client.post(
            "/v1/files", files={"file": ("a.jsonl", big)}, data={"purpose": "batch"}
        )
        assert answer.status_code == 413
        assert answer.json()["error"]["code"] == "payload_too_large"


async def test_cancel_mid_way_keeps_what_finished(
    api: Api, sdk: openai.AsyncOpenAI, simulator: Simulator, start_worker: WorkerFactory
) -> None:
    simulator.config.latency_s = 0.3
    await start_worker()  # 20 slots: about 20 lines finish before the cancel
    uploaded = await upload(sdk, jsonl([line(f"r{i}", f"q{i}") for i in range(200)]))
    created = await sdk.batches.create(
        input_file_id=uploaded.id, endpoint="/v1/chat/completions", completion_window="24h"
    )
    deadline = asyncio.get_running_loop().time() + 20
    while True:
        batch = await sdk.batches.retrieve(created.id)
        assert batch.request_counts is not None
        if batch.request_counts.completed >= 5:
            break
        assert asyncio.get_running_loop().time() < deadline
        await asyncio.sleep(0.05)
    cancelling = await sdk.batches.cancel(created.id)
    assert cancelling.status == "cancelling"
    done = await wait_for(sdk, created.id, "cancelled")
    assert done.cancelled_at is not None and done.request_counts is not None
    completed = done.request_counts.completed
    assert 5 <= completed < 200
    assert completed + done.request_counts.failed == 200
    assert done.output_file_id and done.error_file_id
    output = await read_lines(sdk, done.output_file_id)
    errors = await read_lines(sdk, done.error_file_id)
    assert len(output) == completed and len(errors) == 200 - completed
    assert {item["custom_id"] for item in output + errors} == {f"r{i}" for i in range(200)}
    assert all(item["error"]["code"] == "batch_cancelled" for item in errors)
    # Nothing is left to run: the provider saw no more than what had started.
    calls = simulator.stats.requests
    await asyncio.sleep(0.5)
    assert simulator.stats.requests == calls
    with pytest.raises(openai.ConflictError):
        await sdk.batches.cancel(created.id)
