"""DNS rebinding (issue 23 item 9): an API without authentication on loopback answers only
loopback Host names and the configured ones, with a JSON error otherwise."""

from __future__ import annotations

import signal

import httpx
import pytest

from flow_api.api.security import host_allowed
from tests.operations.conftest import Up, afinish, send


@pytest.mark.parametrize(
    ("host", "allowed"),
    [
        ("localhost", True),
        ("localhost:3000", True),
        ("LOCALHOST.", True),
        ("app.localhost:3000", True),
        ("127.0.0.1:3000", True),
        ("127.1.2.3", True),
        ("[::1]:3000", True),
        ("attacker.example", False),
        ("attacker.example:3000", False),
        ("127.0.0.1.attacker.example", False),
        ("localhost.attacker.example", False),
        ("", False),
        ("flow.internal:3000", True),
        ("api.example.com", True),
        ("example.com", False),
    ],
)
def test_which_hosts_are_answered(host: str, allowed: bool) -> None:
    assert host_allowed(host, ["flow.internal", "*.example.com"]) is allowed


async def test_up_refuses_a_rebound_host_with_json_and_serves_loopback(up: Up) -> None:
    up.env["FLOW_API_ALLOWED_HOSTS"] = '["flow.internal"]'
    process = await up.started()
    try:
        async with httpx.AsyncClient(base_url=up.base) as client:
            body = {"prompt": "hello"}
            rebound = await client.post(
                "/api/ai/generate", json=body, headers={"Host": "attacker.example"}
            )
            configured = await client.post(
                "/api/ai/generate", json=body, headers={"Host": "flow.internal:3000"}
            )
            loopback = await client.post("/api/ai/generate", json=body)
            probe = await client.get("/healthz", headers={"Host": "10.0.0.7:3000"})
    finally:
        send(process, signal.SIGINT)
        code, output = await afinish(process)
    assert code == 0, output
    assert rebound.status_code == 421
    assert rebound.json()["error"]["code"] == "host_not_allowed"
    assert "FLOW_API_ALLOWED_HOSTS" in rebound.json()["error"]["message"]
    assert rebound.headers["x-content-type-options"] == "nosniff"
    assert configured.status_code == 202, configured.text
    assert loopback.status_code == 202, loopback.text
    assert probe.status_code == 200
