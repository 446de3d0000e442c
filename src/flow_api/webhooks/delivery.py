"""One delivery attempt: check the address again, sign, POST, record what happened.

The request goes to the address the SSRF check just approved (the URL's host replaced by that
address, the name kept for `Host`, TLS SNI and certificate checks), never to a second lookup's
answer. Redirects are not followed (a 3xx is a failed attempt), the environment's proxies are
ignored (a proxy would make its own lookup), and the receiver's answer body is never read: only
its status code is kept, in the job's record.
"""

from __future__ import annotations

import asyncio
import logging
import ssl
from typing import Any

import httpx

from flow_api.errors import WebhookUrlRefused
from flow_api.jobs import now_ms
from flow_api.queue.deliveries import AttemptLog, Delivery, DeliveryFailed
from flow_api.settings import WebhookSettings
from flow_api.webhooks.address import AllowList, Target, check_url
from flow_api.webhooks.secrets import SecretStore, signature, utc

log = logging.getLogger(__name__)

USER_AGENT = "flow-api-webhooks/1"


class Sender:
    """Sends deliveries; one HTTP connection pool for the worker process (`aclose()` it)."""

    def __init__(
        self,
        settings: WebhookSettings,
        secrets: SecretStore,
        attempts: AttemptLog,
        tls: ssl.SSLContext | None = None,
    ) -> None:
        """`tls`: the context checking receivers' certificates (default: httpx's, the system's
        trusted CAs)."""
        self.settings = settings
        self.allow = AllowList.parse(settings.allow_hosts)
        self.secrets = secrets
        self.attempts = attempts
        self.client = httpx.AsyncClient(
            follow_redirects=False,
            trust_env=False,
            verify=tls if tls is not None else True,
            timeout=httpx.Timeout(settings.timeout_s),
        )

    async def aclose(self) -> None:
        await self.client.aclose()

    async def send(self, delivery: Delivery, attempt: int) -> None:
        """One attempt; raises `DeliveryFailed` unless the receiver answered 2xx."""
        started = now_ms()
        status: int | None = None
        error: str | None = None
        try:
            status = await self._post(delivery, started)
        except WebhookUrlRefused as exc:
            error = exc.message
        except DeliveryFailed as exc:
            error = str(exc)
        except (httpx.HTTPError, TimeoutError, OSError) as exc:
            error = f"{type(exc).__name__}: no answer from the receiver"
        delivered = status is not None and 200 <= status < 300
        if status is not None and not delivered:
            error = f"the receiver answered {status}"
        entry: dict[str, Any] = {
            "event": "webhook",
            "at": started,
            "attempt": attempt,
            "eventId": delivery.event_id,
            "type": delivery.type.value,
            "durationMs": now_ms() - started,
            "delivered": delivered,
        }
        if status is not None:
            entry["statusCode"] = status
        if error is not None:
            entry["error"] = error
        await self.attempts.record(delivery.job_id, entry)
        log.info(
            "job %s: webhook %s attempt %d: %s",
            delivery.job_id,
            delivery.event_id,
            attempt,
            "delivered" if delivered else error,
        )
        if not delivered:
            raise DeliveryFailed(error or "not delivered")

    async def _post(self, delivery: Delivery, started: int) -> int:
        target = await check_url(delivery.url, self.allow)
        tenant = await self.secrets.get(delivery.tenant)
        if tenant is None:
            raise DeliveryFailed(f"tenant {delivery.tenant!r} has no webhook secret")
        at = utc(started)
        headers = {
            "content-type": "application/json",
            "user-agent": USER_AGENT,
            "host": target.host_header,
            "webhook-id": delivery.event_id,
            "webhook-timestamp": str(started // 1000),
            "webhook-signature": signature(
                tenant.signing(started), delivery.event_id, at, delivery.body
            ),
        }
        async with asyncio.timeout(self.settings.timeout_s):
            return await self._first_answer(target, headers, delivery.body)

    async def _first_answer(self, target: Target, headers: dict[str, str], body: str) -> int:
        """The status code from the first checked address that accepts a connection."""
        extensions = {"sni_hostname": target.host} if target.scheme == "https" else {}
        failure: Exception | None = None
        for address in target.addresses:
            try:
                async with self.client.stream(
                    "POST",
                    target.url_at(address),
                    content=body.encode(),
                    headers=headers,
                    extensions=extensions,
                ) as answer:
                    return answer.status_code  # the body is never read
            except httpx.ConnectError as exc:
                failure = exc
        assert failure is not None  # addresses is never empty
        raise failure
