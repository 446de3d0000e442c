"""The start-up guard: without keys the API serves only on loopback, unless told otherwise."""

from __future__ import annotations

import asyncio
import logging
import subprocess
from pathlib import Path

import httpx
import pytest

from flow_api.api.app import create_app
from flow_api.auth.exposure import InsecureBinding, is_loopback
from flow_api.embedded import EmbeddedValkey, free_port
from flow_api.settings import ApiSettings, AuthSettings
from tests.support import make_settings
from tests.support.processes import flow_api, stop


def api_env(valkey: EmbeddedValkey, port: int, **extra: str) -> dict[str, str]:
    return {
        "FLOW_REDIS_URL": valkey.url,
        "FLOW_API_HOST": "0.0.0.0",
        "FLOW_API_PORT": str(port),
        "FLOW_PROVIDER_FAKE_ENABLED": "true",
        "FLOW_LOCAL_ENABLED": "false",
        **extra,
    }


async def wait_until_serving(port: int, process: subprocess.Popen[bytes]) -> httpx.Response:
    async with httpx.AsyncClient(base_url=f"http://127.0.0.1:{port}", timeout=5) as client:
        for _ in range(300):
            try:
                return await client.post("/api/ai/generate", json={"prompt": "hi"})
            except httpx.TransportError:
                await asyncio.sleep(0.1)
    raise AssertionError(f"flow-api api (pid {process.pid}) did not serve")


def test_api_beyond_loopback_without_auth_refuses_to_start(valkey: EmbeddedValkey) -> None:
    process = flow_api("api", env=api_env(valkey, free_port()))
    process.wait(60)  # it stops by itself
    code, output = stop(process)
    assert code == 2
    assert "refusing to serve on 0.0.0.0 without authentication" in output
    assert "FLOW_AUTH_ENABLED=true" in output and "FLOW_AUTH_ALLOW_UNAUTHENTICATED=true" in output
    assert "Traceback" not in output


@pytest.mark.parametrize(
    ("args", "host_env"),
    [
        (("api", "--host", "0.0.0.0"), "127.0.0.1"),
        (("api", "--reload", "--host", "0.0.0.0"), "127.0.0.1"),
        (("api", "--reload"), "0.0.0.0"),
        (("up", "--data-dir", "{tmp}"), "0.0.0.0"),
    ],
    ids=["api --host", "api --reload --host", "api --reload, host from env", "up, host from env"],
)
def test_every_way_of_binding_beyond_loopback_meets_the_guard(
    valkey: EmbeddedValkey, tmp_path: Path, args: tuple[str, ...], host_env: str
) -> None:
    argv = [arg.format(tmp=tmp_path / "data") for arg in args]
    process = flow_api(*argv, env=api_env(valkey, free_port(), FLOW_API_HOST=host_env))
    try:
        process.wait(30)  # it stops by itself, before serving anything
    except subprocess.TimeoutExpired:
        stop(process)
        pytest.fail(f"`flow-api {' '.join(argv)}` served on 0.0.0.0 without authentication")
    code, output = stop(process)
    assert code == 2, output
    assert "refusing to serve on 0.0.0.0 without authentication" in output
    assert "Traceback" not in output
    assert not (tmp_path / "data" / "appendonlydir").exists()  # `up` started no Valkey


async def test_reload_beyond_loopback_serves_with_auth_on_the_address_it_checked(
    valkey: EmbeddedValkey,
) -> None:
    port = free_port()
    env = api_env(valkey, port, FLOW_API_HOST="127.0.0.1", FLOW_AUTH_ENABLED="true")
    process = flow_api("api", "--reload", "--host", "0.0.0.0", "--port", str(port), env=env)
    try:
        answer = await wait_until_serving(port, process)
        assert answer.status_code == 401  # the reloaded app has authentication on
    finally:
        code, output = stop(process)
    assert code == 0, output
    assert "authentication on" in output and "Traceback" not in output, output


@pytest.mark.parametrize(
    ("extra", "expected_status", "says"),
    [
        ({"FLOW_AUTH_ALLOW_UNAUTHENTICATED": "true"}, 202, "authentication off on 0.0.0.0"),
        ({"FLOW_AUTH_ENABLED": "true"}, 401, "authentication on"),
    ],
)
async def test_api_beyond_loopback_starts_with_auth_or_the_override(
    valkey: EmbeddedValkey, extra: dict[str, str], expected_status: int, says: str
) -> None:
    port = free_port()
    process = flow_api("api", env=api_env(valkey, port, **extra))
    try:
        answer = await wait_until_serving(port, process)
        assert answer.status_code == expected_status
    finally:
        code, output = stop(process)
    assert code == 0, output
    assert says in output


def test_loopback_without_auth_says_so(
    valkey: EmbeddedValkey, caplog: pytest.LogCaptureFixture
) -> None:
    caplog.set_level(logging.INFO)
    create_app(make_settings(valkey.url))
    assert "authentication off: bound to loopback (127.0.0.1)" in caplog.text
    with pytest.raises(InsecureBinding):
        create_app(make_settings(valkey.url, api=ApiSettings(host="10.1.2.3")))
    create_app(
        make_settings(valkey.url, api=ApiSettings(host="::"), auth=AuthSettings(enabled=True))
    )


@pytest.mark.parametrize(
    ("host", "loopback"),
    [
        ("127.0.0.1", True),
        ("127.8.9.10", True),
        ("::1", True),
        ("[::1]", True),
        ("localhost", True),
        ("0.0.0.0", False),
        ("::", False),
        ("10.0.0.5", False),
        ("api.internal", False),
    ],
)
def test_is_loopback(host: str, loopback: bool) -> None:
    assert is_loopback(host) is loopback
