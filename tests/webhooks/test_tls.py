"""An https delivery connects to the checked address but checks the certificate against the
URL's host name (SNI and verification), so pinning the address costs no TLS safety."""

from __future__ import annotations

import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509

from flow_api.embedded import free_port
from flow_api.settings import WebhookSettings
from flow_api.webhooks.address import Target
from flow_api.webhooks.delivery import Sender
from tests.support.certificates import self_signed

HOST = "hooks.test"


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `HOST` only (not for 127.0.0.1)."""
    return self_signed(folder, "hooks", HOST, x509.DNSName(HOST))


@pytest.fixture
async def tls_receiver(tmp_path: Path) -> AsyncIterator[tuple[int, Path, list[str]]]:
    cert, key = certificate(tmp_path)
    hosts: list[str] = []

    async def handle(request: web.Request) -> web.Response:
        hosts.append(request.headers["Host"])
        return web.Response(status=204)

    app = web.Application()
    app.router.add_post("/hooks", handle)
    runner = web.AppRunner(app, handle_signals=False)
    await runner.setup()
    serving = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    serving.load_cert_chain(cert, key)
    port = free_port()
    await web.TCPSite(runner, "127.0.0.1", port, ssl_context=serving).start()
    yield port, cert, hosts
    await runner.cleanup()


def target(host: str, port: int) -> Target:
    return Target("https", host, port, "/hooks", (ipaddress.ip_address("127.0.0.1"),))


async def test_the_certificate_is_checked_for_the_url_host_not_the_address(
    tls_receiver: tuple[int, Path, list[str]],
) -> None:
    port, cert, hosts = tls_receiver
    trusting = ssl.create_default_context(cafile=str(cert))
    sender = Sender(WebhookSettings(), secrets=None, attempts=None, tls=trusting)  # type: ignore[arg-type]
    try:
        status = await sender._first_answer(target(HOST, port), {"host": f"{HOST}:{port}"}, "{}")
        assert status == 204
        assert hosts == [f"{HOST}:{port}"]
        with pytest.raises(httpx.ConnectError):  # the same address under another name
            await sender._first_answer(target("other.test", port), {"host": "other.test"}, "{}")
    finally:
        await sender.aclose()
