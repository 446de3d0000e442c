"""Hostile input over real HTTP and a real Valkey.

Whatever arrives, the service answers a 4xx with our JSON error body and a stable `error.code`,
or accepts the request and loses nothing of it; it never answers 5xx. Cases marked `bug` are
known server bugs (strict xfail): they pass once the bug is fixed, and then the mark must go.
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from typing import Any

import httpx
import pytest

from flow_api.keys import CANCEL_FIELD
from flow_api.queue.connection import connect
from tests.support import Api

GENERATE = "/api/ai/generate"
JSON = {"content-type": "application/json"}
JOB_PATHS = ("status/{}", "result/{}", "jobs/{}")


def bug(reason: str) -> pytest.MarkDecorator:
    return pytest.mark.xfail(strict=True, raises=AssertionError, reason=f"BUG: {reason}")


def nested(opening: bytes, closing: bytes, depth: int, inner: bytes = b"") -> bytes:
    return opening * depth + inner + closing * depth


def with_options(options: bytes) -> bytes:
    return b'{"prompt":"x","options":' + options + b"}"


def huge(option: str, digits: int = 1000, sign: str = "") -> bytes:
    """Options whose `option` is the integer 10**digits (negated with `sign="-"`)."""
    number = (sign + "1" + "0" * digits).encode()
    return with_options(b'{"' + option.encode() + b'":' + number + b"}")


def error_code(answer: httpx.Response) -> str:
    """The `error.code` of a 4xx answer with our JSON error body; fails on anything else."""
    assert 400 <= answer.status_code < 500, (answer.status_code, answer.text[:300])
    assert answer.headers["content-type"].startswith("application/json"), answer.headers
    error = answer.json()["error"]
    assert isinstance(error["message"], str) and error["message"], error
    code = error["code"]
    assert isinstance(code, str) and code, error
    return code


async def post_raw(
    client: httpx.AsyncClient, body: bytes, headers: dict[str, str] | None = None
) -> httpx.Response:
    return await client.post(GENERATE, content=body, headers=JSON if headers is None else headers)


async def raw_exchange(port: int, request: bytes) -> tuple[int, bytes]:
    """Send bytes exactly as given (httpx would correct them); read one answer's status and
    body."""
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        writer.write(request)
        await writer.drain()
        head = await asyncio.wait_for(reader.readuntil(b"\r\n\r\n"), 10)
        status = int(head.split(b" ", 2)[1])
        length = 0
        for line in head.split(b"\r\n")[1:]:
            name, _, value = line.partition(b":")
            if name.strip().lower() == b"content-length":
                length = int(value)
        return status, await asyncio.wait_for(reader.readexactly(length), 10)
    finally:
        writer.close()
        with contextlib.suppress(ConnectionError):
            await writer.wait_closed()


async def stored_request(client: httpx.AsyncClient, answer: httpx.Response) -> dict[str, Any]:
    """The request as the service kept it, read back through `GET /api/ai/jobs/{id}`."""
    assert answer.status_code == 202, answer.text[:300]
    record = await client.get(f"/api/ai/jobs/{answer.json()['jobId']}")
    assert record.status_code == 200, record.text[:300]
    request: dict[str, Any] = record.json()["request"]
    return request


# --- bodies ----------------------------------------------------------------------------------

PLAIN_TEXT = {"content-type": "text/plain"}
FORM = {"content-type": "application/x-www-form-urlencoded"}

REFUSED: list[tuple[str, dict[str, str], bytes, int, str]] = [
    (
        "metadata nested 100k levels",
        JSON,
        with_options(b'{"metadata":' + nested(b'{"a":', b"}", 100_000, b"1") + b"}"),
        400,
        "invalid_json",
    ),
    ("top-level array nested 100k levels", JSON, nested(b"[", b"]", 100_000), 400, "invalid_json"),
    (
        "prompt an array nested 100k levels",
        JSON,
        b'{"prompt":' + nested(b"[", b"]", 100_000) + b"}",
        400,
        "invalid_json",
    ),
    ("invalid UTF-8 in a string", JSON, b'{"prompt":"\xff\xfe"}', 400, "invalid_json"),
    ("Latin-1 text", JSON, '{"prompt":"café"}'.encode("latin-1"), 400, "invalid_json"),
    ("truncated UTF-8 sequence", JSON, b'{"prompt":"\xe2\x82"}', 400, "invalid_json"),
    ("raw NUL inside a string", JSON, b'{"prompt":"a\x00b"}', 400, "invalid_json"),
    ("raw NUL bytes only", JSON, b"\x00" * 64, 400, "invalid_json"),
    ("raw NUL after the JSON", JSON, b'{"prompt":"x"}\x00', 400, "invalid_json"),
    # Not sent as JSON: 415, on purpose (text/plain needs no CORS preflight from a web page).
    ("JSON body sent as text/plain", PLAIN_TEXT, b'{"prompt":"x"}', 415, "unsupported_media_type"),
    ("form-encoded body", FORM, b"prompt=x", 415, "unsupported_media_type"),
    ("no content type", {}, b'{"prompt":"x"}', 415, "unsupported_media_type"),
    ("temperature 1e400", JSON, with_options(b'{"temperature":1e400}'), 422, "invalid_value"),
    ("temperature 10**1000", JSON, huge("temperature"), 422, "invalid_value"),
    ("maxTokens 10**1000", JSON, huge("maxTokens"), 422, "invalid_value"),
    ("priority -10**1000", JSON, huge("priority", sign="-"), 422, "invalid_value"),
    # Python refuses to parse integers of over 4300 digits: the body is not read at all.
    ("maxTokens with 5000 digits", JSON, huge("maxTokens", digits=5000), 400, "invalid_json"),
    ("temperature NaN", JSON, with_options(b'{"temperature":NaN}'), 422, "invalid_value"),
    ("temperature Infinity", JSON, with_options(b'{"temperature":Infinity}'), 422, "invalid_value"),
    (
        "temperature -Infinity",
        JSON,
        with_options(b'{"temperature":-Infinity}'),
        422,
        "invalid_value",
    ),
    ("maxTokens NaN", JSON, with_options(b'{"maxTokens":NaN}'), 422, "invalid_type"),
    ("lone high surrogate in prompt", JSON, b'{"prompt":"\\ud800"}', 422, "invalid_value"),
    (
        "lone low surrogate in system",
        JSON,
        with_options(b'{"system":"\\udfff"}'),
        422,
        "invalid_value",
    ),
]


@pytest.mark.parametrize(
    ("headers", "body", "status", "code"), [pytest.param(*c[1:], id=c[0]) for c in REFUSED]
)
async def test_hostile_body_gets_a_json_4xx(
    fresh: httpx.AsyncClient, headers: dict[str, str], body: bytes, status: int, code: str
) -> None:
    answer = await post_raw(fresh, body, headers)
    assert (answer.status_code, error_code(answer)) == (status, code), answer.text[:300]


# JSON the service could not store and give back faithfully: refused with a 4xx naming the field.
MISHANDLED: list[Any] = [
    pytest.param(
        {},
        with_options(b'{"metadata":' + nested(b'{"a":', b"}", 300, b"1") + b"}"),
        id="metadata nested 300 levels",
    ),
    pytest.param(
        {},
        with_options(b'{"metadata":{"n":1' + b"0" * 30 + b"}}"),
        id="metadata integer over 64 bits",
    ),
    pytest.param(
        {},
        with_options(b'{"metadata":{"k":"\\ud800"}}'),
        id="metadata lone surrogate",
    ),
    pytest.param(
        {"Idempotency-Key": "hostile-seed"},
        with_options(b'{"seed":1' + b"0" * 30 + b"}"),
        id="seed over 64 bits with an Idempotency-Key",
    ),
    pytest.param(
        {"Idempotency-Key": "hostile-stop"},
        with_options(b'{"stop":["\\ud800"]}'),
        id="stop lone surrogate with an Idempotency-Key",
    ),
    pytest.param(
        {},
        with_options(b'{"metadata":{"n":NaN}}'),
        id="metadata NaN",
    ),
    pytest.param(
        {},
        with_options(b'{"metadata":{"n":1e400}}'),
        id="metadata 1e400",
    ),
]


@pytest.mark.parametrize(("headers", "body"), MISHANDLED)
async def test_json_the_service_cannot_keep_is_refused(
    fresh: httpx.AsyncClient, headers: dict[str, str], body: bytes
) -> None:
    answer = await post_raw(fresh, body, {**JSON, **headers})
    assert error_code(answer)


async def test_lone_surrogate_in_stop_is_refused_or_kept(fresh: httpx.AsyncClient) -> None:
    answer = await post_raw(fresh, with_options(b'{"stop":["\\ud800"]}'))
    if answer.status_code != 202:
        error_code(answer)
        return
    await stored_request(fresh, answer)


@pytest.mark.parametrize(
    ("body", "prompt"),
    [
        (b'{"prompt":"a\\u0000b"}', "a\x00b"),
        (b'{"prompt":"\\u0000"}', "\x00"),
        (b'{"prompt":"\\ud83d\\ude00 \\u2028\\ufeff"}', "\U0001f600 \u2028\ufeff"),
        (b'{"prompt":"\\\\..\\/..\\/etc\\/passwd"}', "\\../../etc/passwd"),
    ],
    ids=["escaped NUL inside", "only an escaped NUL", "surrogate pair and odd spaces", "escapes"],
)
async def test_valid_but_odd_json_is_accepted_and_kept_exactly(
    fresh: httpx.AsyncClient, body: bytes, prompt: str
) -> None:
    """`\\u0000` escaped is valid JSON and a valid string: accepted, and kept as sent."""
    answer = await post_raw(fresh, body)
    assert (await stored_request(fresh, answer))["prompt"] == prompt


async def test_duplicate_keys_keep_the_last_value(fresh: httpx.AsyncClient) -> None:
    """RFC 8259 leaves duplicate names to the parser; ours keeps the last one, consistently."""
    answer = await post_raw(
        fresh, b'{"prompt":"first","options":{"maxTokens":1,"maxTokens":7},"prompt":"second"}'
    )
    request = await stored_request(fresh, answer)
    assert request == {"prompt": "second", "options": {"maxTokens": 7}}


# --- size ------------------------------------------------------------------------------------


async def test_body_over_the_limit_is_413_with_or_without_content_length(
    api: Api, fresh: httpx.AsyncClient
) -> None:
    limit = api.settings.api.max_body_bytes
    body = b'{"prompt":"' + b"y" * limit + b'"}'
    declared = await post_raw(fresh, body)
    assert (declared.status_code, error_code(declared)) == (413, "payload_too_large")

    async def chunks() -> AsyncIterator[bytes]:  # no Content-Length: counted as it streams
        for start in range(0, len(body), 64 * 1024):
            yield body[start : start + 64 * 1024]

    streamed = await fresh.post(GENERATE, content=chunks(), headers=JSON)
    assert "content-length" not in streamed.request.headers
    assert (streamed.status_code, error_code(streamed)) == (413, "payload_too_large")


@pytest.mark.parametrize("length", ["1048577", "9" * 19], ids=["limit+1", "19 digits"])
async def test_declared_length_over_the_limit_is_413_before_any_body_arrives(
    api: Api, length: str
) -> None:
    limit = api.settings.api.max_body_bytes
    assert int(length) > limit
    head = (
        f"POST {GENERATE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
        f"Content-Length: {length}\r\n\r\n"
    )
    status, body = await raw_exchange(api.settings.api.port, head.encode())  # no body sent
    assert status == 413
    assert httpx.Response(status, content=body).json()["error"]["code"] == "payload_too_large"


async def test_body_of_exactly_the_limit_is_read(api: Api, fresh: httpx.AsyncClient) -> None:
    limit = api.settings.api.max_body_bytes
    body = b'{"prompt":"x"}'
    answer = await post_raw(fresh, body + b" " * (limit - len(body)))
    assert answer.status_code == 202, answer.text[:300]


async def test_huge_header_is_not_a_server_error(fresh: httpx.AsyncClient) -> None:
    answer = await fresh.get("/healthz", headers={"X-Filler": "a" * 1_000_000})
    if answer.status_code >= 400:
        error_code(answer)
    assert answer.status_code == 200


async def test_huge_idempotency_key_is_422(fresh: httpx.AsyncClient) -> None:
    answer = await post_raw(fresh, b'{"prompt":"x"}', {**JSON, "Idempotency-Key": "k" * 1_000_000})
    assert (answer.status_code, error_code(answer)) == (422, "invalid_request")
    assert answer.json()["error"]["field"] == "Idempotency-Key"


# --- job ids ---------------------------------------------------------------------------------

ODD_IDS: list[tuple[str, str]] = [
    ("..%2F..", "not_found"),  # decoded to `/`: no such route
    ("..%2F..%2Fhealthz", "not_found"),
    ("%2e%2e", "job_not_found"),
    ("%00", "job_not_found"),
    ("a%00b", "job_not_found"),
    ("x" * 10_000, "job_not_found"),
    ("bull:flow-ai:meta", "job_not_found"),
    ("bull%3Aflow-ai%3Await", "job_not_found"),
    ("%ff%fe", "job_not_found"),
    ("%0d%0aSet-Cookie:%20a=b", "job_not_found"),
    ("%20", "job_not_found"),
    ("*", "job_not_found"),
]


@pytest.mark.parametrize(("job_id", "code"), ODD_IDS, ids=[i[:20] for i, _ in ODD_IDS])
async def test_odd_job_ids_are_404_on_every_job_endpoint(
    fresh: httpx.AsyncClient, job_id: str, code: str
) -> None:
    answers = [await fresh.get(f"/api/ai/{path.format(job_id)}") for path in JOB_PATHS]
    answers.append(await fresh.post(f"/api/ai/jobs/{job_id}/cancel"))
    answers.append(await fresh.delete(f"/api/ai/jobs/{job_id}"))
    for answer in answers:
        assert (answer.status_code, error_code(answer)) == (404, code), answer.request.url
        assert "set-cookie" not in answer.headers


async def test_the_queues_own_keys_are_not_job_ids(api: Api, fresh: httpx.AsyncClient) -> None:
    queue = api.settings.redis.queue_name
    for job_id in (f"bull:{queue}:meta", f"bull:{queue}:wait", f"bull:{queue}:events"):
        answers = [await fresh.get(f"/api/ai/{path.format(job_id)}") for path in JOB_PATHS]
        answers.append(await fresh.post(f"/api/ai/jobs/{job_id}/cancel"))
        for answer in answers:
            assert (answer.status_code, error_code(answer)) == (404, "job_not_found")


RESERVED = ["meta", "events", "wait", "id", "marker", "prioritized", "pc"]


@pytest.mark.parametrize(
    "job_id",
    [pytest.param(name) for name in RESERVED],
)
async def test_bullmq_key_names_are_not_job_ids(
    api: Api, fresh: httpx.AsyncClient, job_id: str
) -> None:
    for options in ({}, {"priority": 3}):  # so that wait, prioritized, pc, marker... exist
        await api.submit("fill the queue's keys", **options)
    answers = [await fresh.get(f"/api/ai/{path.format(job_id)}") for path in JOB_PATHS]
    answers.append(await fresh.post(f"/api/ai/jobs/{job_id}/cancel"))
    answers.append(await fresh.delete(f"/api/ai/jobs/{job_id}"))
    redis = connect(api.settings.redis)
    try:
        meta = await redis.hkeys(
            f"{api.settings.redis.prefix}:{api.settings.redis.queue_name}:meta"
        )
    finally:
        await redis.aclose()
    assert CANCEL_FIELD not in meta, "a cancel flag was written into the queue's meta hash"
    for answer in answers:
        assert (answer.status_code, error_code(answer)) == (404, "job_not_found"), (
            answer.request.method,
            answer.request.url,
        )


# --- methods and framing ---------------------------------------------------------------------

ALLOWED: dict[str, set[str]] = {
    GENERATE: {"POST"},
    "/api/ai/status/x": {"GET"},
    "/api/ai/result/x": {"GET"},
    "/api/ai/jobs/x": {"GET", "DELETE"},
    "/api/ai/jobs/x/cancel": {"POST"},
    "/healthz": {"GET"},
    "/readyz": {"GET"},
}
METHODS = ("GET", "POST", "PUT", "PATCH", "DELETE", "OPTIONS", "TRACE")


@pytest.mark.parametrize("path", list(ALLOWED))
async def test_methods_not_allowed_are_json_405(fresh: httpx.AsyncClient, path: str) -> None:
    for method in sorted(set(METHODS) - ALLOWED[path]):
        answer = await fresh.request(method, path, content=b'{"prompt":"x"}', headers=JSON)
        assert (answer.status_code, error_code(answer)) == (405, "method_not_allowed"), method


@pytest.mark.parametrize(
    "path",
    [pytest.param(path) for path in ALLOWED],
)
async def test_405_allow_header_lists_every_method(fresh: httpx.AsyncClient, path: str) -> None:
    answer = await fresh.put(path)
    assert answer.status_code == 405
    allowed = {m.strip() for m in answer.headers["allow"].split(",")}
    assert ALLOWED[path] <= allowed, answer.headers["allow"]


async def test_unknown_method_is_refused_not_a_server_error(api: Api) -> None:
    # httptools refuses a method it does not know before the app sees the request, so this
    # answer is uvicorn's plain-text 400, not our JSON body.
    request = f"FOO {GENERATE} HTTP/1.1\r\nHost: x\r\nContent-Length: 0\r\n\r\n"
    status, _ = await raw_exchange(api.settings.api.port, request.encode())
    assert status == 400


BAD_FRAMING = {
    "Content-Length not a number": "Content-Length: abc\r\n",
    "negative Content-Length": "Content-Length: -1\r\n",
    "Content-Length over 64 bits": f"Content-Length: {'9' * 40}\r\n",
    "two different Content-Lengths": "Content-Length: 14\r\nContent-Length: 5\r\n",
    "Content-Length and chunked": "Content-Length: 14\r\nTransfer-Encoding: chunked\r\n",
    "unknown transfer coding": "Transfer-Encoding: gzip\r\n",
}


@pytest.mark.parametrize("framing", list(BAD_FRAMING.values()), ids=list(BAD_FRAMING))
async def test_ambiguous_framing_is_refused_not_a_server_error(api: Api, framing: str) -> None:
    # Refused by the HTTP parser (uvicorn's plain-text 400) before the app, which is what
    # prevents request smuggling; our JSON body cannot be produced at that layer.
    request = f"POST {GENERATE} HTTP/1.1\r\nHost: localhost\r\nContent-Type: application/json\r\n"
    status, _ = await raw_exchange(
        api.settings.api.port, (request + framing + "\r\n").encode() + b'{"prompt":"x"}'
    )
    assert status == 400
    assert (await api.client.get("/healthz")).status_code == 200
