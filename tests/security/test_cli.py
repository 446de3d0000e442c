"""`flow-api keys create | list | revoke` as real processes against the test Valkey; the keys
they make work over HTTP at once, and stop working once revoked."""

from __future__ import annotations

import asyncio
import os
import subprocess
import sys
from typing import Any

import orjson

from flow_api.settings import Settings
from tests.security.conftest import bearer
from tests.support import Api


def keys(settings: Settings, *args: str) -> subprocess.CompletedProcess[str]:
    env = {
        **os.environ,
        "FLOW_REDIS_URL": settings.redis.url,
        "FLOW_REDIS_QUEUE_NAME": settings.redis.queue_name,
    }
    return subprocess.run(
        [sys.executable, "-m", "flow_api.cli", "keys", *args],
        env=env,
        capture_output=True,
        text=True,
        timeout=60,
    )


def listed(settings: Settings, *args: str) -> list[dict[str, Any]]:
    done = keys(settings, "list", "--json", *args)
    assert done.returncode == 0, done.stderr
    rows: list[dict[str, Any]] = orjson.loads(done.stdout)
    return rows


async def test_created_key_works_until_revoked(api: Api, settings: Settings) -> None:
    created = keys(settings, "create", "--tenant", "acme", "--name", "ci")
    assert created.returncode == 0, created.stderr
    key = created.stdout.strip()  # the key alone on stdout, for KEY=$(flow-api keys create ...)
    assert key.startswith("flow_") and "\n" not in key
    assert "shown only this once" in created.stderr and key not in created.stderr

    submit = await api.client.post("/api/ai/generate", json={"prompt": "hi"}, headers=bearer(key))
    assert submit.status_code == 202
    job_id = submit.json()["jobId"]

    as_json = keys(settings, "list", "--json", "--tenant", "acme")
    [row] = orjson.loads(as_json.stdout)
    assert row["tenant"] == "acme" and row["name"] == "ci"
    assert row["scopes"] == ["read", "submit"] and row["status"] == "active"
    table = keys(settings, "list")
    assert row["id"] in table.stdout and "acme" in table.stdout
    for output in (table.stdout, as_json.stdout):
        assert key not in output and key[5:] not in output  # never shown again

    revoked = keys(settings, "revoke", row["id"])
    assert revoked.returncode == 0, revoked.stderr
    assert row["id"] in revoked.stdout
    after = await api.client.get(f"/api/ai/status/{job_id}", headers=bearer(key))
    assert after.status_code == 401
    again = keys(settings, "revoke", row["id"])
    assert again.returncode == 1 and "no key" in again.stderr


async def test_create_with_scopes_expiry_and_limits(api: Api, settings: Settings) -> None:
    created = keys(
        settings,
        "create",
        "--tenant",
        "globex",
        "--name",
        "dashboard",
        "--scopes",
        "read",
        "--expires-in-days",
        "30",
        "--requests-per-minute",
        "5",
        "--tokens-per-day",
        "1000",
        "--json",
    )
    assert created.returncode == 0, created.stderr
    body = orjson.loads(created.stdout)
    assert body["scopes"] == ["read"] and body["expiresAt"] is not None
    assert body["requestsPerMinute"] == 5 and body["tokensPerDay"] == 1000
    assert "digest" not in body
    refused = await api.client.post(
        "/api/ai/generate", json={"prompt": "hi"}, headers=bearer(body["key"])
    )
    assert refused.status_code == 403


async def test_bad_arguments_fail_with_a_message(settings: Settings) -> None:
    cases = [
        (("--tenant", "acme", "--name", "x", "--scopes", "root"), "unknown scope"),
        (("--tenant", "no spaces", "--name", "x"), "tenant"),
    ]
    usage = [  # refused by the argument parser: exit code 2, one line
        (("--tenant", "acme", "--name", "x", "--expires-in-days", "0"), "--expires-in-days"),
        (("--tenant", "acme", "--name", "x", "--expires-in-days", "1e9"), "36500"),
        (("--tenant", "acme", "--name", "x", "--expires-in-days", "nan"), "'nan'"),
        (("--tenant", "acme", "--name", "x", "--expires-in-days", "soon"), "'soon'"),
    ]
    runs = [asyncio.to_thread(keys, settings, "create", *args) for args, _ in cases + usage]
    done_all = await asyncio.gather(*runs)
    for done, (args, says) in zip(done_all, cases + usage, strict=True):
        assert done.returncode == (1 if (args, says) in cases else 2), done.stderr
        assert says in done.stderr
        assert "Traceback" not in done.stderr
        assert len(done.stderr.strip().splitlines()) == 1, done.stderr
    assert listed(settings) == []
