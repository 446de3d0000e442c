"""Nothing leaks: jobs run with a canary provider key and a canary prompt, then every log line at
INFO, every HTTP answer and every value stored in Redis is searched.

Redis legitimately holds the prompt (it is the job's data, shown to its own tenant), so there the
search is for the provider key and the API key plaintexts; logs at INFO must hold neither those
nor the prompt.
"""

from __future__ import annotations

import asyncio
import logging
import uuid
from collections.abc import AsyncIterator

import httpx
import openai
import pytest
from redis.asyncio import Redis

from flow_api.auth.api_keys import ApiKeyStore
from flow_api.auth.principal import Scope
from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.providers.sdk_errors import map_sdk_error
from flow_api.redaction import redact_secrets
from flow_api.settings import AuthSettings, Settings
from flow_api.testing.simulator import Simulator
from flow_api.worker import FlowWorker
from tests.security.conftest import KeyMaker, bearer, simulated_settings
from tests.support.processes import flow_api, stop

PROVIDER_KEY = f"sk-SECRET-canary-{uuid.uuid4().hex}"
PROMPT_MARK = f"CANARY-PROMPT-{uuid.uuid4().hex}"
PROMPTS = [
    f"tell me about {PROMPT_MARK}",
    f"[[sim:canary-{uuid.uuid4().hex[:8]}:500,ok]] retried {PROMPT_MARK}",
    f"[[sim:canary-{uuid.uuid4().hex[:8]}:401]] refused {PROMPT_MARK}",
    f"[[sim:canary-{uuid.uuid4().hex[:8]}:400]] rejected {PROMPT_MARK}",
]


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator, auth_settings: AuthSettings) -> Settings:
    return simulated_settings(valkey, simulator, auth_settings, PROVIDER_KEY)


@pytest.fixture
async def raw_redis(valkey: EmbeddedValkey) -> AsyncIterator[Redis]:
    client = Redis.from_url(valkey.url, decode_responses=False)
    yield client
    await client.aclose()


async def everything_stored(redis: Redis) -> bytes:
    """Every key name and value in the database, whatever its type."""
    chunks: list[bytes] = []
    async for key in redis.scan_iter(count=1000):
        chunks.append(key)
        kind = (await redis.type(key)).decode()
        if kind == "string":
            chunks.append(await redis.get(key) or b"")
        elif kind == "hash":
            for field, value in (await redis.hgetall(key)).items():
                chunks += [field, value]
        elif kind == "list":
            chunks += await redis.lrange(key, 0, -1)
        elif kind == "set":
            chunks += list(await redis.smembers(key))
        elif kind == "zset":
            chunks += [member for member, _ in await redis.zrange(key, 0, -1, withscores=True)]
        elif kind == "stream":
            for _, fields in await redis.xrange(key):
                for field, value in fields.items():
                    chunks += [field, value]
    return b"\n".join(chunks)


def secrets_in(text: str | bytes, *secrets: str) -> list[str]:
    data = text if isinstance(text, bytes) else text.encode()
    return [s for s in secrets if s.encode() in data]


async def test_no_key_in_answers_or_redis_and_no_prompt_in_info_logs(
    caller: KeyMaker,
    worker: FlowWorker,
    simulator: Simulator,
    raw_redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    caplog.set_level(logging.INFO)
    acme = await caller("acme")
    job_ids = [await acme.submit(prompt) for prompt in PROMPTS]
    outcomes = [(await acme.wait(job_id))["status"] for job_id in job_ids]
    assert outcomes == ["completed", "completed", "failed", "failed"]
    assert simulator.stats.requests == 5  # the provider really was called, with the key

    answers: list[bytes] = []
    for job_id in job_ids:
        for path in ("status", "result", "jobs"):
            answer = await acme.get(f"/api/ai/{path}/{job_id}")
            answers.append(answer.content + str(answer.headers).encode())
    record = (await acme.get(f"/api/ai/jobs/{job_ids[2]}")).json()
    assert record["error"]["code"] == "provider_auth_failed"
    assert PROMPT_MARK in record["request"]["prompt"]  # its own tenant may read the prompt

    assert secrets_in(b"\n".join(answers), PROVIDER_KEY, acme.key) == []
    stored = await everything_stored(raw_redis)
    assert PROMPT_MARK.encode() in stored  # the scan does see job data
    assert secrets_in(stored, PROVIDER_KEY, acme.key) == []
    logged = "\n".join(
        f"{r.name}: {r.getMessage()} {r.exc_text or ''}"
        for r in caplog.records
        if r.levelno >= logging.INFO
    )
    assert "job " in logged  # the workers did log at INFO
    assert secrets_in(logged, PROVIDER_KEY, acme.key, PROMPT_MARK) == []


@pytest.mark.parametrize("level", ["INFO", "DEBUG"])
async def test_processes_log_no_key_and_no_prompt(
    settings: Settings, simulator: Simulator, store: ApiKeyStore, raw_redis: Redis, level: str
) -> None:
    """`flow-api api` and `flow-api worker` as real processes, keys from the environment; at
    DEBUG too (the SDKs' own debug logs quote request bodies and headers)."""
    port = free_port()
    env = {
        "FLOW_REDIS_URL": settings.redis.url,
        "FLOW_REDIS_QUEUE_NAME": settings.redis.queue_name,
        "FLOW_API_PORT": str(port),
        "FLOW_AUTH_ENABLED": "true",
        "FLOW_PROVIDER_DEFAULT": "openai",
        "FLOW_PROVIDER_FAKE_ENABLED": "false",
        "FLOW_LOCAL_ENABLED": "false",
        "OPENAI_API_KEY": PROVIDER_KEY,
        "OPENAI_BASE_URL": simulator.base_url,
        "FLOW_OPENAI_MODEL": "gpt-sim",
        "FLOW_WORKER_BACKOFF_BASE_MS": "50",
        "FLOW_LOG_LEVEL": level,
    }
    _, key = await store.create("acme", "canary", frozenset({Scope.SUBMIT, Scope.READ}))
    api = flow_api("api", env=env)
    worker = flow_api("worker", env=env)
    outputs: list[str] = []
    try:
        async with httpx.AsyncClient(
            base_url=f"http://127.0.0.1:{port}", headers=bearer(key), timeout=10
        ) as client:
            for _ in range(300):
                try:
                    if (await client.get("/healthz")).status_code == 200:
                        break
                except httpx.TransportError:
                    await asyncio.sleep(0.1)
            jobs = []
            for prompt in PROMPTS:
                answer = await client.post("/api/ai/generate", json={"prompt": prompt})
                assert answer.status_code == 202, answer.text
                jobs.append(answer.json()["jobId"])
            for job_id in jobs:
                for _ in range(400):
                    status = (await client.get(f"/api/ai/status/{job_id}")).json()["status"]
                    if status in ("completed", "failed"):
                        break
                    await asyncio.sleep(0.05)
                assert status in ("completed", "failed")
    finally:
        for process in (api, worker):
            outputs.append(stop(process)[1])
    output = "\n".join(outputs)
    assert "worker consuming queue" in output and "authentication on" in output
    if level == "DEBUG":
        assert " DEBUG " in output  # the level took effect: debug lines were searched too
    assert secrets_in(output, PROVIDER_KEY, key, PROMPT_MARK) == []
    stored = await everything_stored(raw_redis)
    assert PROMPT_MARK.encode() in stored
    assert secrets_in(stored, PROVIDER_KEY, key) == []


def test_provider_errors_that_quote_a_key_are_scrubbed() -> None:
    """OpenAI's real 401 quotes the refused key, masked; even that is not passed on."""
    request = httpx.Request("POST", "https://api.openai.com/v1/chat/completions")
    response = httpx.Response(401, request=request)
    quoted = "Incorrect API key provided: sk-proj-abcd************************wxyz. See docs."
    error = openai.AuthenticationError(quoted, response=response, body=None)
    mapped = map_sdk_error(error, openai)
    assert mapped is not None and mapped.code == "provider_auth_failed"
    assert "sk-" not in mapped.message and "wxyz" not in mapped.message
    assert "[redacted]" in mapped.message
    assert redact_secrets("Authorization: Bearer flow_abc.def") == "Authorization: [redacted]"
    assert redact_secrets(f"key {PROVIDER_KEY}!") == "key [redacted]!"
    assert redact_secrets("job 3f0c9a1b and sk-") == "job 3f0c9a1b and sk-"
    for harmless in ("waited 3 times (FLOW_BUDGET_MAX_DEFERRALS)", "max_tokens: 5", "tokens=9"):
        assert redact_secrets(harmless) == harmless  # setting names and counts stay readable
    assert redact_secrets("http://u:pw@h/x?api-key=k&n=1") == (
        "http://u:[redacted]@h/x?api-key=[redacted]&n=1"
    )


GATEWAY_PASSWORD = f"gw-pass-{uuid.uuid4().hex}"
PARAM_SECRET = f"param-{uuid.uuid4().hex}"
GATEWAY_NOTE = (
    f"(relayed by http://relay:{GATEWAY_PASSWORD}@10.0.0.5:8080/v1?api-key={PARAM_SECRET}, "
    f"upstream key {PROVIDER_KEY})"
)
SECRETS = (GATEWAY_PASSWORD, PARAM_SECRET, PROVIDER_KEY)


async def test_secrets_quoted_in_provider_errors_reach_no_job_history_or_log(
    caller: KeyMaker,
    worker: FlowWorker,
    simulator: Simulator,
    raw_redis: Redis,
    caplog: pytest.LogCaptureFixture,
) -> None:
    """A gateway in front of the provider quotes its own URL (with a password and a key
    parameter) and the provider key in every error: through each error branch (5xx, 4xx, too
    long a context, content filter), none of it is stored, answered or logged."""
    caplog.set_level(logging.DEBUG)
    simulator.config.error_note = GATEWAY_NOTE
    acme = await caller("acme")
    steps = ["500", "400", "ctx", "filter"]
    job_ids = [
        await acme.submit(f"[[sim:note-{uuid.uuid4().hex[:8]}:{step}]] hi") for step in steps
    ]
    answers: list[bytes] = []
    codes = []
    for job_id in job_ids:
        assert (await acme.wait(job_id))["status"] == "failed"
        record = await acme.get(f"/api/ai/jobs/{job_id}")
        codes.append(record.json()["error"]["code"])
        for answer in (record, await acme.get(f"/api/ai/result/{job_id}")):
            answers.append(answer.content)
    assert codes == [
        "provider_unavailable",
        "provider_rejected",
        "context_too_long",
        "content_filtered",
    ]
    assert b"relay:[redacted]@10.0.0.5" in b"\n".join(answers)  # the note did come through
    assert secrets_in(b"\n".join(answers), *SECRETS) == []
    assert secrets_in(await everything_stored(raw_redis), *SECRETS) == []
    logged = "\n".join(f"{r.getMessage()} {r.exc_text or ''}" for r in caplog.records)
    assert secrets_in(logged, *SECRETS) == []


def test_connection_and_unexpected_provider_errors_are_scrubbed() -> None:
    """The branches that pass an exception's own text on (a connection error, an error LangChain
    raised for a too-long context, an unmapped exception) scrub it too."""
    import anthropic
    from langchain_core.exceptions import ContextOverflowError

    request = httpx.Request("POST", "https://gateway.example/v1/chat/completions")
    text = f"cannot reach {GATEWAY_NOTE}"
    for sdk in (openai, anthropic):
        error = sdk.APIConnectionError(message=text, request=request)
        mapped = map_sdk_error(error, sdk)
        assert mapped is not None and mapped.code == "provider_unavailable"
        assert secrets_in(mapped.message, *SECRETS) == [], mapped.message
    context = map_sdk_error(ContextOverflowError(text), openai)
    assert context is not None and context.code == "context_too_long"
    assert secrets_in(context.message, *SECRETS) == [], context.message


async def test_an_unmapped_provider_exception_is_scrubbed() -> None:
    from langchain_core.language_models import BaseChatModel
    from langchain_core.outputs import ChatResult

    from flow_api.errors import ProviderError
    from flow_api.models import GenerateRequest
    from flow_api.pipeline import generate
    from flow_api.providers.base import Provider

    class Broken(BaseChatModel):
        @property
        def _llm_type(self) -> str:
            return "broken"

        def _generate(self, *args: object, **kwargs: object) -> ChatResult:
            raise NotImplementedError

        async def _agenerate(self, *args: object, **kwargs: object) -> ChatResult:
            raise RuntimeError(f"transport failed {GATEWAY_NOTE}")

    class BrokenProvider(Provider):
        name = "fake"

        def build(self, model: str) -> BaseChatModel:
            return Broken()

    with pytest.raises(ProviderError) as raised:
        await generate(BrokenProvider("m"), "m", GenerateRequest(prompt="hi"))
    assert "unexpected provider failure: RuntimeError" in raised.value.message
    assert secrets_in(raised.value.message, *SECRETS) == [], raised.value.message
