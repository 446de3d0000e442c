"""An https delivery connects to the checked address but checks the certificate against the
URL's host name (SNI and verification), so pinning the address costs no TLS safety."""

from __future__ import annotations

import datetime
import ipaddress
import ssl
from collections.abc import AsyncIterator
from pathlib import Path

import httpx
import pytest
from aiohttp import web
from cryptography import x509
from cryptography.hazmat.primitives import hashes, serialization
from cryptography.hazmat.primitives.asymmetric import ec
from cryptography.x509.oid import NameOID

from flow_api.embedded import free_port
from flow_api.settings import WebhookSettings
from flow_api.webhooks.address import Target
from flow_api.webhooks.delivery import Sender

HOST = "hooks.test"


def certificate(folder: Path) -> tuple[Path, Path]:
    """A self-signed certificate for `HOST` only (not for 127.0.0.1)."""
    key = ec.generate_private_key(ec.SECP256R1())
    name = x509.Name([x509.NameAttribute(NameOID.COMMON_NAME, HOST)])
    now = datetime.datetime.now(datetime.UTC)
    cert = (
        x509.CertificateBuilder()
        .subject_name(name)
        .issuer_name(name)
        .public_key(key.public_key())
        .serial_number(x509.random_serial_number())
        .not_valid_before(now - datetime.timedelta(minutes=5))
        .not_valid_after(now + datetime.timedelta(days=1))
        .add_extension(x509.SubjectAlternativeName([x509.DNSName(HOST)]), critical=False)
        .add_extension(x509.BasicConstraints(ca=True, path_length=None), critical=True)
        .sign(key, hashes.SHA256())
    )
    cert_file, key_file = folder / "hooks.crt", folder / "hooks.key"
    cert_file.write_bytes(cert.public_bytes(serialization.Encoding.PEM))
    key_file.write_bytes(
        key.private_bytes(
            serialization.Encoding.PEM,
            serialization.PrivateFormat.PKCS8,
            serialization.NoEncryption(),
        )
    )
    return cert_file, key_file


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
