"""The SSRF guard: which URLs are refused at submit and again at delivery."""

from __future__ import annotations

import asyncio
import ipaddress
from typing import Any

import pytest

from flow_api.errors import WebhookUrlRefused
from flow_api.settings import Settings
from flow_api.webhooks.address import AllowList, check_url, public
from tests.support import Api, WorkerFactory
from tests.webhooks.receiver import Receiver

NONE = AllowList.parse([])


@pytest.mark.parametrize(
    "address",
    [
        "127.0.0.1",
        "127.8.9.10",
        "10.1.2.3",
        "172.16.0.1",
        "192.168.1.1",
        "169.254.169.254",  # cloud metadata
        "100.64.0.1",  # carrier-grade NAT
        "0.0.0.0",
        "224.0.0.1",
        "255.255.255.255",
        "::1",
        "::",
        "fe80::1",
        "fc00::1",
        "fd12:3456::1",
        "ff02::1",
        "::ffff:127.0.0.1",  # IPv4-mapped loopback
        "::ffff:10.0.0.1",
        "::ffff:169.254.169.254",
    ],
)
def test_inward_addresses_are_not_public(address: str) -> None:
    assert not public(ipaddress.ip_address(address))


@pytest.mark.parametrize("address", ["93.184.215.14", "8.8.8.8", "2606:4700:4700::1111"])
def test_internet_addresses_are_public(address: str) -> None:
    assert public(ipaddress.ip_address(address))


@pytest.mark.parametrize(
    ("url", "why"),
    [
        ("http://93.184.215.14/hook", "must be https"),
        ("ftp://93.184.215.14/hook", "must be an https:// URL"),
        ("https:///nohost", "must be an https:// URL"),
        ("https://user:pw@93.184.215.14/", "credentials"),
        ("https://127.0.0.1/hook", "127.0.0.1"),
        ("https://[::1]/hook", "::1"),
        ("https://[::ffff:a9fe:a9fe]/hook", "::ffff:a9fe:a9fe"),
        ("https://169.254.169.254/latest/meta-data", "169.254.169.254"),
        ("https://localhost/hook", "resolves to"),
        ("https://93.184.215.14/" + "é" * 1100, "over 2048 bytes"),
    ],
)
async def test_refused_urls(url: str, why: str) -> None:
    with pytest.raises(WebhookUrlRefused) as refused:
        await check_url(url, NONE)
    assert why in refused.value.message
    assert refused.value.field == "options.webhook.url"


async def test_the_allow_list_admits_named_hosts_and_networks() -> None:
    by_network = await check_url("http://127.0.0.1:9/x", AllowList.parse(["127.0.0.0/8"]))
    assert by_network.url_at(by_network.addresses[0]) == "http://127.0.0.1:9/x"
    by_name = await check_url("http://localhost:9/x?a=1", AllowList.parse(["localhost"]))
    assert by_name.host_header == "localhost:9"
    assert by_name.path == "/x?a=1"
    # Allow-listing one network does not open another.
    with pytest.raises(WebhookUrlRefused):
        await check_url("https://10.0.0.1/x", AllowList.parse(["127.0.0.0/8"]))


async def test_an_ip_literal_target_connects_to_that_address() -> None:
    target = await check_url("https://[2606:4700:4700::1111]:8443/h", NONE)
    assert target.url_at(target.addresses[0]) == "https://[2606:4700:4700::1111]:8443/h"
    assert target.host_header == "[2606:4700:4700::1111]:8443"


@pytest.mark.parametrize(
    "url",
    [
        "https://127.0.0.2/hook",
        "https://10.0.0.1/hook",
        "http://example.com/hook",
        "https://[::ffff:7f00:1]/hook",
    ],
)
async def test_submit_refuses_a_private_or_plain_http_webhook_with_422(
    api: Api, secret: str, url: str
) -> None:
    answer = await api.post(
        "/api/ai/generate", {"prompt": "p", "options": {"webhook": {"url": url}}}
    )
    assert answer.status_code == 422, answer.text
    error = answer.json()["error"]
    assert error["code"] == "webhook_url_refused"
    assert error["field"] == "options.webhook.url"


async def test_submit_refuses_a_webhook_url_over_2_kib(api: Api, secret: str) -> None:
    url = "https://example.com/" + "a" * 2100
    answer = await api.post(
        "/api/ai/generate", {"prompt": "p", "options": {"webhook": {"url": url}}}
    )
    assert answer.status_code == 422, answer.text
    assert answer.json()["error"]["details"][0]["field"] == "options.webhook.url"


async def test_submit_refuses_unknown_event_names(api: Api, secret: str) -> None:
    hook = {"url": "https://example.com/h", "events": ["finished"]}
    answer = await api.post("/api/ai/generate", {"prompt": "p", "options": {"webhook": hook}})
    assert answer.status_code == 422, answer.text


async def test_delivery_checks_the_address_again(
    api: Api, settings: Settings, start_worker: WorkerFactory, receiver: Receiver, secret: str
) -> None:
    """A URL that the API accepted but the worker now refuses (here its allow-list is empty,
    as after a DNS answer turned private) is refused at delivery: no request leaves, and the
    refusal is in the job's record."""
    strict = settings.webhook.model_copy(update={"allow_hosts": []})
    await start_worker(settings.model_copy(update={"webhook": strict}))
    job_id = await api.submit("p", webhook={"url": receiver.url})
    await api.wait(job_id)
    record = await _wait_for_webhook_attempts(api, job_id, 1)
    assert receiver.received == []
    assert record["webhooks"][0]["delivered"] is False
    assert "must be https" in record["webhooks"][0]["error"]


async def _wait_for_webhook_attempts(api: Api, job_id: str, count: int) -> dict[str, Any]:
    for _ in range(200):
        record = await api.record(job_id)
        if len(record.get("webhooks") or []) >= count:
            return record
        await asyncio.sleep(0.05)
    raise AssertionError(f"no webhook attempt recorded for {job_id}")


async def submit_with(api: Api, webhook: dict[str, Any]) -> Any:
    return await api.post("/api/ai/generate", {"prompt": "p", "options": {"webhook": webhook}})
