"""`flow-api webhooks ...`: secrets per tenant, rotation with a grace period, tenant defaults."""

from __future__ import annotations

import asyncio
import os
import subprocess

import orjson
import pytest
from standardwebhooks.webhooks import WebhookVerificationError

from flow_api.settings import Settings
from flow_api.testing.children import env_for, flow_api_command
from flow_api.worker import FlowWorker
from tests.support import Api
from tests.webhooks.receiver import Receiver


def run_cli(settings: Settings, *args: str, **env: str) -> subprocess.CompletedProcess[str]:
    """`flow-api webhooks ARGS` as a process, with the environment that builds `settings`."""
    return subprocess.run(
        flow_api_command("webhooks", *args),
        env={**os.environ, **env_for(settings, **env)},
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )


async def cli(settings: Settings, *args: str, **env: str) -> tuple[str, str]:
    """`run_cli` off the event loop; its stdout and stderr (asserting exit 0)."""
    done = await asyncio.to_thread(run_cli, settings, *args, **env)
    assert done.returncode == 0, done.stderr
    return done.stdout, done.stderr


async def test_rotate_keeps_the_old_secret_valid_for_the_grace_period(
    api: Api, worker: FlowWorker, receiver: Receiver, settings: Settings
) -> None:
    first = (await cli(settings, "secret", "rotate", "--tenant", "default"))[0].strip()
    assert first.startswith("whsec_")
    await api.submit("one", webhook={"url": receiver.url})
    got = await receiver.wait_for(1)
    assert len(got[0].headers["webhook-signature"].split(" ")) == 1
    got[0].verify(first)

    second, note = await cli(settings, "secret", "rotate", "--tenant", "default")
    second = second.strip()
    assert second != first and "also signs" in note
    await api.submit("two", webhook={"url": receiver.url})
    got = await receiver.wait_for(2)
    assert len(got[1].headers["webhook-signature"].split(" ")) == 2
    got[1].verify(second)  # receivers already switched...
    got[1].verify(first)  # ...and those not yet

    third = (
        await cli(
            settings, "secret", "rotate", "--tenant", "default", FLOW_WEBHOOK_SECRET_GRACE_S="0"
        )
    )[0].strip()
    await api.submit("three", webhook={"url": receiver.url})
    got = await receiver.wait_for(3)
    got[2].verify(third)
    with pytest.raises(WebhookVerificationError):
        got[2].verify(second)


async def test_secrets_are_per_tenant(settings: Settings) -> None:
    a = (await cli(settings, "secret", "rotate", "--tenant", "team-a"))[0].strip()
    b = (await cli(settings, "secret", "rotate", "--tenant", "team-b"))[0].strip()
    assert a != b


async def test_a_tenant_without_a_secret_cannot_subscribe(api: Api, receiver: Receiver) -> None:
    answer = await api.post(
        "/api/ai/generate", {"prompt": "p", "options": {"webhook": {"url": receiver.url}}}
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "webhook_secret_missing"
    assert "flow-api webhooks secret rotate --tenant default" in error["message"]


async def test_a_tenant_default_applies_to_jobs_naming_no_webhook(
    api: Api, worker: FlowWorker, receiver: Receiver, settings: Settings, secret: str
) -> None:
    await cli(
        settings,
        "default",
        "set",
        "--tenant",
        "default",
        "--url",
        receiver.url,
        "--events",
        "completed",
    )
    listing = orjson.loads((await cli(settings, "default", "list"))[0])
    assert listing == {"default": {"url": receiver.url, "events": ["completed"]}}
    job_id = await api.submit("no webhook of its own")
    got = await receiver.wait_for(1)
    assert got[0].verify(secret)["data"]["jobId"] == job_id
    _, note = await cli(settings, "default", "clear", "--tenant", "default")
    assert "cleared" in note
    assert orjson.loads((await cli(settings, "default", "list"))[0]) == {}


async def test_a_private_default_is_refused_by_the_cli(settings: Settings) -> None:
    url = "https://10.0.0.1/h"
    done = await asyncio.to_thread(
        run_cli, settings, "default", "set", "--tenant", "t", "--url", url
    )
    assert done.returncode == 1
    assert "private" in done.stderr
