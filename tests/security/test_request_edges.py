"""The edges of a request, over a real socket with authentication on: the key is checked before
the body is read, a body that never completes is cut, odd bodies get a clear JSON answer, and
another tenant's job id costs the API what an unknown id costs."""

from __future__ import annotations

import asyncio
import uuid

import orjson
import pytest
from redis.asyncio import Redis

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import ApiSettings, Settings
from tests.security.conftest import KeyMaker
from tests.support import Api

GENERATE = "/api/ai/generate"


async def raw_request(port: int, head: str, body: bytes, wait_s: float) -> tuple[bytes, float]:
    """Send `head` and `body` on a fresh connection, then read until the server closes it
    (or `wait_s` passes); returns what came back and how long the server took to close."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    loop = asyncio.get_running_loop()
    started = loop.time()
    writer.write(head.replace("\n", "\r\n").encode() + b"\r\n" + body)
    await writer.drain()
    received = b""
    try:
        async with asyncio.timeout(wait_s):
            while chunk := await reader.read(65536):
                received += chunk
    except TimeoutError:
        received += b"<still open>"
    finally:
        writer.close()
    return received, loop.time() - started


def head(path: str, length: int, key: str | None = None) -> str:
    lines = [
        f"POST {path} HTTP/1.1",
        "Host: 127.0.0.1",
        "Content-Type: application/json",
        f"Content-Length: {length}",
    ]
    if key is not None:
        lines.append(f"Authorization: Bearer {key}")
    return "\n".join(lines) + "\n"


def status_and_body(raw: bytes) -> tuple[int, dict[str, object]]:
    header, _, body = raw.partition(b"\r\n\r\n")
    return int(header.split(b" ", 2)[1]), orjson.loads(body)


# --- the key before the body -------------------------------------------------------------------


@pytest.mark.parametrize("body", [b"{not json", b'{"prompt": 1}', b"[]"])
async def test_a_request_without_a_valid_key_is_401_whatever_its_body(
    api: Api, body: bytes
) -> None:
    for headers in ({}, {"Authorization": "Bearer flow_not-a-key-at-all-0000000000"}):
        answer = await api.client.post(
            GENERATE, content=body, headers={"Content-Type": "application/json", **headers}
        )
        assert answer.status_code == 401, answer.text
        assert answer.json()["error"]["code"] == "unauthorized"


async def test_401_comes_before_a_partial_body_is_read(api: Api) -> None:
    """Headers and half of the declared body, no key: the answer is at once, the connection
    closed, not held while the server waits for the rest."""
    raw, took = await raw_request(api.settings.api.port, head(GENERATE, 1000), b'{"prom', 5)
    status, body = status_and_body(raw)
    assert status == 401 and body["error"] == {
        "code": "unauthorized",
        "message": "send an API key: `Authorization: Bearer <key>`",
    }
    assert took < 2


@pytest.fixture
def settings(valkey: EmbeddedValkey, settings: Settings) -> Settings:
    """Authentication on, and a short body timeout so the slow-body test is quick."""
    api = settings.api.model_copy(update={"body_timeout_s": 1.0})
    return settings.model_copy(update={"api": api})


async def test_a_body_that_never_completes_is_cut_with_408(api: Api, caller: KeyMaker) -> None:
    acme = await caller("acme")
    raw, took = await raw_request(
        api.settings.api.port, head(GENERATE, 1000, acme.key), b'{"prompt": "hal', 10
    )
    status, body = status_and_body(raw)
    assert status == 408, raw
    assert body["error"] == {
        "code": "request_timeout",
        "message": "the request body did not arrive within 1 s",
    }
    assert b"connection: close" in raw.lower()
    assert 0.9 < took < 5  # cut at the timeout (1 s here), and the connection closed


def test_the_default_body_timeout_is_well_under_25_s() -> None:
    assert ApiSettings().body_timeout_s <= 10


async def test_a_body_sent_in_slow_pieces_within_the_timeout_is_accepted(
    api: Api, caller: KeyMaker
) -> None:
    acme = await caller("acme")
    body = orjson.dumps({"prompt": "slow but steady"})
    reader, writer = await asyncio.open_connection("127.0.0.1", api.settings.api.port)
    writer.write(head(GENERATE, len(body), acme.key).replace("\n", "\r\n").encode() + b"\r\n")
    for piece in (body[:5], body[5:10], body[10:]):
        writer.write(piece)
        await writer.drain()
        await asyncio.sleep(0.2)
    answer = await reader.readuntil(b"\r\n\r\n")
    writer.close()
    assert answer.startswith(b"HTTP/1.1 202"), answer


# --- bodies that are not what they should be -----------------------------------------------------


async def test_an_empty_stop_sequence_is_refused_at_submit(caller: KeyMaker) -> None:
    acme = await caller("acme")
    answer = await acme.post(GENERATE, {"prompt": "hi", "options": {"stop": ["end", ""]}})
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["details"][0]["field"] == "options.stop.1"
    assert "at least 1 character" in error["message"]


async def test_a_5000_digit_integer_is_named_as_such(caller: KeyMaker) -> None:
    acme = await caller("acme")
    body = b'{"prompt": "hi", "options": {"maxTokens": ' + b"9" * 5000 + b"}}"
    answer = await acme.client.post(
        GENERATE, content=body, headers={**acme.headers, "Content-Type": "application/json"}
    )
    assert answer.status_code == 400, answer.text
    error = answer.json()["error"]
    assert error["code"] == "invalid_json"
    assert "number too long" in error["message"] and "4300 digits" in error["message"]
    bad_utf8 = await acme.client.post(
        GENERATE,
        content=b'{"prompt": "\xff"}',
        headers={**acme.headers, "Content-Type": "application/json"},
    )
    assert bad_utf8.json()["error"]["message"] == "the body could not be read as UTF-8 JSON"


@pytest.mark.parametrize("content_type", ["text/plain", "text/plain;charset=UTF-8", None])
async def test_json_sent_as_another_type_is_415(caller: KeyMaker, content_type: str | None) -> None:
    """Accepting JSON as text/plain would let any web page submit to a loopback API without a
    CORS preflight; a clear 415 says what to send instead."""
    acme = await caller("acme")
    typed = {"Content-Type": content_type} if content_type else {}
    answer = await acme.client.post(
        GENERATE, content=orjson.dumps({"prompt": "hi"}), headers={**acme.headers, **typed}
    )
    assert answer.status_code == 415, answer.text
    error = answer.json()["error"]
    assert error["code"] == "unsupported_media_type"
    assert "Content-Type: application/json" in error["message"]


# --- another tenant's id ------------------------------------------------------------------------


async def redis_bytes_out(redis: Redis) -> int:
    info = await redis.info("stats")
    return int(info["total_net_output_bytes"])


async def test_another_tenants_id_is_answered_without_reading_its_job(
    caller: KeyMaker, valkey: EmbeddedValkey
) -> None:
    """No worker runs: the only Redis client is the API. A foreign id's 404 must not carry the
    job out of Redis (a larger, slower answer that tells a real id from a random one)."""
    acme, globex = await caller("acme"), await caller("globex")
    job_id = await acme.submit("x" * 20_000)
    redis = Redis.from_url(valkey.url)
    try:

        async def cost(id_: str) -> int:
            before = await redis_bytes_out(redis)
            answer = await globex.get(f"/api/ai/status/{id_}")
            assert answer.status_code == 404 and answer.json()["error"]["code"] == "job_not_found"
            return await redis_bytes_out(redis) - before

        foreign = [await cost(job_id) for _ in range(3)]
        unknown = [await cost(str(uuid.uuid4())) for _ in range(3)]
    finally:
        await redis.aclose()
    assert (await acme.get(f"/api/ai/status/{job_id}")).status_code == 200
    # INFO's own answer dominates both; a foreign job's hash would add its 20 KB prompt.
    assert max(foreign) < min(unknown) + 1000, (foreign, unknown)


async def test_owner_check_holds_for_every_read(caller: KeyMaker) -> None:
    acme, globex = await caller("acme"), await caller("globex")
    job_id = await acme.submit("mine")
    for path in ("status", "result", "jobs"):
        assert (await globex.get(f"/api/ai/{path}/{job_id}")).status_code == 404
        assert (await acme.get(f"/api/ai/{path}/{job_id}")).status_code in (200, 202)


# --- what uvicorn answers itself ----------------------------------------------------------------


@pytest.mark.parametrize(
    "request_head",
    [
        "GARBAGE\n\n",
        "GET /healthz HTTP/1.1\nHost: 127.0.0.1\nBad Header Name: x\n\n",
        "GET /healthz HTTP/1.1\nHost: 127.0.0.1\nContent-Length: nope\n\n",
    ],
    ids=["request line", "header name", "content-length"],
)
async def test_a_request_that_is_not_http_gets_a_json_400(api: Api, request_head: str) -> None:
    raw, _ = await raw_request(api.settings.api.port, request_head, b"", 5)
    status, body = status_and_body(raw)
    assert status == 400
    assert body == {
        "error": {
            "code": "malformed_request",
            "message": "the request line or headers are not valid HTTP/1.1",
        }
    }
    head = raw.partition(b"\r\n\r\n")[0].lower()
    assert b"content-type: application/json" in head and b"x-content-type-options: nosniff" in head
    assert not raw.endswith(b"<still open>")  # and the connection is closed
