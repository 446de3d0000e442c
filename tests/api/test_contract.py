"""The v1 contract over real HTTP and a real Valkey: every endpoint, transition and error."""

from __future__ import annotations

import asyncio
from typing import Any

import httpx
import pytest

from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.settings import OpenAISettings
from flow_api.worker import FlowWorker
from tests.support import Api, WorkerFactory, make_settings, start_api


async def test_submit_answers_202_with_an_unguessable_id(api: Api) -> None:
    answer = await api.client.post("/api/ai/generate", json={"prompt": "hi"})
    assert answer.status_code == 202
    body = answer.json()
    assert body["status"] == "waiting"
    assert len(body["jobId"]) == 32 and int(body["jobId"], 16) >= 0  # 128-bit random UUID
    assert answer.headers["location"] == f"/api/ai/status/{body['jobId']}"
    other = await api.submit("hi")
    assert other != body["jobId"]


async def test_waiting_job_status_and_pending_result(api: Api) -> None:
    job_id = await api.submit("no worker yet", metadata={"ticket": "T-1"})
    status = await api.client.get(f"/api/ai/status/{job_id}")
    assert status.status_code == 200
    body = status.json()
    assert body["status"] == "waiting"
    assert body["attempts"] == 0
    assert body["metadata"] == {"ticket": "T-1"}
    assert "createdAt" in body and "startedAt" not in body
    pending = await api.client.get(f"/api/ai/result/{job_id}")
    assert pending.status_code == 202
    assert pending.headers["retry-after"] == "1"
    assert pending.json()["status"] == "waiting"


async def test_job_runs_to_completed_with_result_and_record(api: Api, worker: FlowWorker) -> None:
    job_id = await api.submit(
        "hello there", temperature=0.2, maxTokens=50, system="be brief", metadata={"k": 1}
    )
    status = await api.wait(job_id)
    assert status["status"] == "completed"
    assert status["attempts"] == 1
    assert status["startedAt"] and status["finishedAt"]

    result = await api.client.get(f"/api/ai/result/{job_id}")
    assert result.status_code == 200
    body = result.json()
    assert body["result"]["text"] == "echo: hello there"
    assert body["result"]["provider"] == "fake"
    assert body["result"]["model"] == "echo"
    assert body["result"]["finishReason"] == "stop"
    usage = body["result"]["usage"]
    assert usage == {"promptTokens": 4, "completionTokens": 3, "totalTokens": 7}
    assert body["metadata"] == {"k": 1}

    record = (await api.client.get(f"/api/ai/jobs/{job_id}")).json()
    assert record["request"]["prompt"] == "hello there"
    assert record["request"]["options"]["maxTokens"] == 50
    assert record["status"] == "completed"
    assert record["result"]["text"] == "echo: hello there"
    assert [a["attempt"] for a in record["attempts"]] == [1]
    assert record["attempts"][0]["provider"] == "fake"
    assert "error" not in record["attempts"][0]
    messages = [line["message"] for line in record["logs"]]
    assert messages == ["attempt 1 started on fake/echo", "attempt 1 succeeded"]
    timings = record["timings"]
    assert timings["queueMs"] >= 0 and timings["runMs"] >= 0


async def test_max_tokens_truncates_with_finish_reason_length(api: Api, worker: FlowWorker) -> None:
    job_id = await api.submit("one two three four five", maxTokens=2)
    await api.wait(job_id)
    result = (await api.client.get(f"/api/ai/result/{job_id}")).json()["result"]
    assert result["text"] == "echo: one"
    assert result["finishReason"] == "length"


async def test_job_submitted_before_any_worker_completes_once_one_starts(
    api: Api, start_worker: WorkerFactory
) -> None:
    ids = [await api.submit(f"early {i}") for i in range(5)]
    await asyncio.sleep(0.3)
    assert {(await api.client.get(f"/api/ai/status/{i}")).json()["status"] for i in ids} == {
        "waiting"
    }
    await start_worker()
    for job_id in ids:
        assert (await api.wait(job_id))["status"] == "completed"


async def test_priority_option_is_accepted(api: Api, worker: FlowWorker) -> None:
    job_id = await api.submit("urgent", priority=1)
    assert (await api.wait(job_id))["status"] == "completed"


@pytest.mark.parametrize("path", ["status", "result", "jobs"])
async def test_unknown_job_is_404_with_code(api: Api, path: str) -> None:
    answer = await api.client.get(f"/api/ai/{path}/does-not-exist")
    assert answer.status_code == 404
    assert answer.json()["error"]["code"] == "job_not_found"
    weird = await api.client.get(f"/api/ai/{path}/bull:x:meta")
    assert weird.status_code == 404


BAD_BODIES: list[tuple[str, Any, int, str, str | None]] = [
    ("missing prompt", {"options": {}}, 422, "missing_field", "prompt"),
    ("empty prompt", {"prompt": ""}, 422, "invalid_value", "prompt"),
    ("non-string prompt", {"prompt": 42}, 422, "invalid_type", "prompt"),
    (
        "temperature too high",
        {"prompt": "x", "options": {"temperature": 2.5}},
        422,
        "invalid_value",
        "options.temperature",
    ),
    (
        "temperature a string",
        {"prompt": "x", "options": {"temperature": "hot"}},
        422,
        "invalid_type",
        "options.temperature",
    ),
    (
        "maxTokens a float",
        {"prompt": "x", "options": {"maxTokens": 1.5}},
        422,
        "invalid_type",
        "options.maxTokens",
    ),
    (
        "unknown option",
        {"prompt": "x", "options": {"colour": "red"}},
        422,
        "unknown_field",
        "options.colour",
    ),
    ("unknown top-level field", {"prompt": "x", "extra": 1}, 422, "unknown_field", "extra"),
    ("options not an object", {"prompt": "x", "options": [1]}, 422, "invalid_type", "options"),
    ("body an array", [1, 2], 422, "invalid_body", "body"),
    ("body a string", "hello", 422, "invalid_body", "body"),
    (
        "unknown provider",
        {"prompt": "x", "options": {"provider": "nope"}},
        422,
        "provider_not_configured",
        "options.provider",
    ),
    (
        "provider not configured",
        {"prompt": "x", "options": {"provider": "openai"}},
        422,
        "provider_not_configured",
        "options.provider",
    ),
]


@pytest.mark.parametrize(
    ("case", "body", "status", "code", "field"), BAD_BODIES, ids=[c[0] for c in BAD_BODIES]
)
async def test_bad_input_gets_a_clear_json_error(
    api: Api, case: str, body: Any, status: int, code: str, field: str | None
) -> None:
    answer = await api.client.post("/api/ai/generate", json=body)
    assert answer.status_code == status, answer.text
    error = answer.json()["error"]
    assert error["code"] == code
    assert error["message"]
    if field is not None:
        assert field in error["message"] or error.get("field") == field


async def test_body_not_json_is_400(api: Api) -> None:
    cases = [
        (b"{not json", 400, "invalid_json"),
        (b"\xff\xfe\x00", 400, "invalid_json"),
        (b'{"prompt": "a\x00b"}', 400, "invalid_json"),  # raw control character
        (b"", 422, "missing_field"),
    ]
    for raw, status, code in cases:
        answer = await api.client.post(
            "/api/ai/generate", content=raw, headers={"content-type": "application/json"}
        )
        assert (answer.status_code, answer.json()["error"]["code"]) == (status, code), raw


async def test_oversized_body_is_413(api: Api) -> None:
    big = "x" * (api.settings.api.max_body_bytes + 10)
    answer = await api.client.post("/api/ai/generate", json={"prompt": big})
    assert answer.status_code == 413
    assert answer.json()["error"]["code"] == "payload_too_large"

    async def chunks() -> Any:  # no Content-Length: counted while streaming
        yield b'{"prompt": "'
        for _ in range(20):
            yield b"y" * 100_000
        yield b'"}'

    streamed = await api.client.post(
        "/api/ai/generate", content=chunks(), headers={"content-type": "application/json"}
    )
    assert streamed.status_code == 413
    assert streamed.json()["error"]["code"] == "payload_too_large"


async def test_prompt_over_the_limit_is_422(api: Api, settings: Any) -> None:
    settings.api.max_prompt_chars = 10
    answer = await api.client.post("/api/ai/generate", json={"prompt": "x" * 11})
    assert answer.status_code == 422
    assert answer.json()["error"]["field"] == "prompt"


async def test_model_not_allowed_is_422(valkey: EmbeddedValkey) -> None:
    settings = make_settings(
        valkey.url,
        openai=OpenAISettings(api_key="sk-x", base_url="http://127.0.0.1:9/v1", models=["m-a"]),
    )
    server, task = await start_api(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api.port}") as c:
            refused = await c.post(
                "/api/ai/generate",
                json={"prompt": "x", "options": {"provider": "openai", "model": "m-b"}},
            )
            allowed = await c.post(
                "/api/ai/generate",
                json={"prompt": "x", "options": {"provider": "openai", "model": "m-a"}},
            )
    finally:
        server.should_exit = True
        await task
    assert refused.status_code == 422
    assert refused.json()["error"]["code"] == "model_not_allowed"
    assert refused.json()["error"]["field"] == "options.model"
    assert allowed.status_code == 202


async def test_health_and_readiness(api: Api) -> None:
    assert (await api.client.get("/healthz")).json() == {"status": "ok"}
    ready = await api.client.get("/readyz")
    assert ready.status_code == 200 and ready.json() == {"status": "ready"}
    docs = await api.client.get("/docs")
    assert docs.status_code == 200
    schema = (await api.client.get("/openapi.json")).json()
    assert "/api/ai/generate" in schema["paths"]


async def test_unknown_route_and_method_are_json(api: Api) -> None:
    missing = await api.client.get("/nope")
    assert missing.status_code == 404 and missing.json()["error"]["code"] == "not_found"
    wrong = await api.client.get("/api/ai/generate")
    assert wrong.status_code == 405 and wrong.json()["error"]["code"] == "method_not_allowed"


async def test_redis_unreachable_is_503_fast_not_500(valkey: EmbeddedValkey) -> None:
    settings = make_settings(valkey.url)
    settings.redis.url = f"redis://127.0.0.1:{free_port()}/0"  # nothing listens there
    server, task = await start_api(settings)
    try:
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{settings.api.port}") as c:
            started = asyncio.get_running_loop().time()
            submit = await c.post("/api/ai/generate", json={"prompt": "x"})
            status = await c.get(f"/api/ai/status/{'0' * 32}")
            ready = await c.get("/readyz")
            alive = await c.get("/healthz")
            elapsed = asyncio.get_running_loop().time() - started
    finally:
        server.should_exit = True
        await task
    for answer in (submit, status, ready):
        assert answer.status_code == 503, answer.text
        assert answer.json()["error"]["code"] == "queue_unavailable"
        assert answer.headers["retry-after"] == "1"
    assert alive.status_code == 200
    assert elapsed < 10
