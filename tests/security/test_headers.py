"""Security headers on every answer, the docs' own CSP, and CORS only for configured origins."""

from __future__ import annotations

import asyncio
import re
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

import httpx
import pytest
import uvicorn
from fastapi import FastAPI

from flow_api.api.app import create_app
from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.settings import AuthSettings
from tests.security.conftest import KeyMaker
from tests.support import Api, make_settings

API_CSP = "default-src 'none'; frame-ancestors 'none'; base-uri 'none'; form-action 'none'"
ORIGIN = "https://dashboard.example"


def assert_secured(answer: httpx.Response, *, docs: bool = False) -> None:
    what = f"{answer.request.method} {answer.request.url.path} -> {answer.status_code}"
    assert answer.headers.get("x-content-type-options") == "nosniff", what
    assert answer.headers.get("x-frame-options") == "DENY", what
    assert answer.headers.get("referrer-policy") == "no-referrer", what
    csp = answer.headers.get("content-security-policy", "")
    if docs:
        assert "frame-ancestors 'none'" in csp and "https://cdn.jsdelivr.net" in csp, what
    else:
        assert csp == API_CSP, what
        assert answer.headers.get("cache-control") == "no-store", what


async def test_every_api_answer_carries_the_security_headers(api: Api, caller: KeyMaker) -> None:
    acme, reader = await caller("acme"), await caller("acme", scopes="read")
    job_id = await acme.submit("hi")
    client = api.client
    answers = [
        await acme.post("/api/ai/generate", {"prompt": "hi"}),  # 202
        await acme.get(f"/api/ai/status/{job_id}"),  # 200
        await acme.get(f"/api/ai/result/{job_id}"),  # 202 pending
        await acme.get("/api/ai/status/nope"),  # 404
        await acme.post("/api/ai/generate", {"prompt": ""}),  # 422
        await reader.post("/api/ai/generate", {"prompt": "hi"}),  # 403
        await client.post("/api/ai/generate", json={"prompt": "hi"}),  # 401
        await client.post(
            "/api/ai/generate",
            content=b"x" * (api.settings.api.max_body_bytes + 1),
            headers=acme.headers,
        ),  # 413, from the body-size middleware (without a key: 401 first)
        await client.get("/no/such/route"),  # 404
        await client.put("/api/ai/generate", headers=acme.headers),  # 405
        await client.get("/healthz"),
        await client.get("/openapi.json"),
    ]
    assert {a.status_code for a in answers} >= {200, 202, 401, 403, 404, 405, 413, 422}
    for answer in answers:
        assert_secured(answer)


@pytest.mark.parametrize("path", ["/docs", "/redoc", "/docs/oauth2-redirect"])
async def test_docs_get_a_csp_that_allows_what_they_load(api: Api, path: str) -> None:
    answer = await api.client.get(path)
    assert answer.status_code == 200
    assert_secured(answer, docs=True)
    csp = answer.headers["content-security-policy"]
    for url in re.findall(r'(?:src|href)="(https://[^/"]+)', answer.text):
        assert url in csp, f"{path} loads from {url}, which its CSP does not allow"


@asynccontextmanager
async def serving(app: FastAPI) -> AsyncIterator[httpx.AsyncClient]:
    """`app` served by uvicorn on a loopback port, as `flow-api api` serves it (uvloop,
    httptools), and a client talking real HTTP to it."""
    port = free_port()
    config = uvicorn.Config(
        app, host="127.0.0.1", port=port, loop="uvloop", http="httptools", log_config=None
    )
    server = uvicorn.Server(config)
    task = asyncio.create_task(server.serve())
    try:
        while not server.started:
            assert not task.done(), "the server stopped during start-up"
            await asyncio.sleep(0.01)
        async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}") as client:
            yield client
    finally:
        server.should_exit = True
        await task


async def test_an_unexpected_500_is_json_and_secured(valkey: EmbeddedValkey) -> None:
    # A route that fails in a way nothing anticipates: the only way to meet an unexpected
    # error on purpose. Everything else is the production app, over real HTTP.
    app = create_app(make_settings(valkey.url))

    @app.get("/boom")
    async def boom() -> None:
        raise RuntimeError("sk-never-shown")

    async with serving(app) as client:
        answer = await client.get("/boom")
    assert answer.status_code == 500
    assert answer.json()["error"]["code"] == "internal_error"
    assert "sk-never-shown" not in answer.text
    assert_secured(answer)


async def test_cors_is_off_by_default(valkey: EmbeddedValkey) -> None:
    async with serving(create_app(make_settings(valkey.url))) as client:
        simple = await client.get("/healthz", headers={"Origin": ORIGIN})
        preflight = await client.options(
            "/api/ai/generate",
            headers={"Origin": ORIGIN, "Access-Control-Request-Method": "POST"},
        )
    assert "access-control-allow-origin" not in simple.headers
    assert "access-control-allow-origin" not in preflight.headers


async def test_cors_allows_only_the_configured_origins(valkey: EmbeddedValkey) -> None:
    settings = make_settings(valkey.url, auth=AuthSettings(cors_origins=[ORIGIN]))
    preflight_headers = {
        "Access-Control-Request-Method": "POST",
        "Access-Control-Request-Headers": "authorization,content-type,idempotency-key",
    }
    async with serving(create_app(settings)) as client:
        allowed = await client.options(
            "/api/ai/generate", headers={"Origin": ORIGIN, **preflight_headers}
        )
        other = await client.options(
            "/api/ai/generate", headers={"Origin": "https://evil.example", **preflight_headers}
        )
        submit = await client.post(
            "/api/ai/generate", json={"prompt": "hi"}, headers={"Origin": ORIGIN}
        )
    assert allowed.status_code == 200
    assert allowed.headers["access-control-allow-origin"] == ORIGIN
    assert "authorization" in allowed.headers["access-control-allow-headers"].lower()
    assert other.status_code == 400
    assert "access-control-allow-origin" not in other.headers
    assert submit.status_code == 202
    assert submit.headers["access-control-allow-origin"] == ORIGIN
    assert "location" in submit.headers["access-control-expose-headers"].lower()
    for answer in (allowed, other, submit):
        assert_secured(answer)
