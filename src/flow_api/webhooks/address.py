"""The SSRF guard: which webhook URLs this service calls, and at which address.

A URL must be https, at most 2 KiB, without credentials, and every address its host resolves to
must be public: loopback, link-local, private (RFC 1918, unique-local, CGNAT), multicast,
unspecified and reserved ranges are refused, IPv4 and IPv6 alike, an IPv4-mapped IPv6 address
judged as the IPv4 address it carries. `FLOW_WEBHOOK_ALLOW_HOSTS` (host names or CIDRs) lifts
both rules for what it names: such a host may be private and plain http.

The check runs at submit (a 422 `webhook_url_refused` naming the field) and again at each
delivery, which then connects to the very address it checked (`Target.addresses`), so a DNS
answer that changes between check and connect (rebinding) cannot steer a delivery inward.
"""

from __future__ import annotations

import asyncio
import ipaddress
import socket
from dataclasses import dataclass
from urllib.parse import urlsplit

from flow_api.errors import WebhookUrlRefused
from flow_api.models import MAX_WEBHOOK_URL_BYTES

IPAddress = ipaddress.IPv4Address | ipaddress.IPv6Address
IPNetwork = ipaddress.IPv4Network | ipaddress.IPv6Network
FIELD = "options.webhook.url"
RESOLVE_TIMEOUT_S = 5.0
"""A submit waits at most this long for DNS (the resolver's own retries can take far longer)."""


@dataclass(frozen=True, slots=True)
class AllowList:
    """`FLOW_WEBHOOK_ALLOW_HOSTS`, parsed: exact host names and networks."""

    hosts: frozenset[str]
    networks: tuple[IPNetwork, ...]

    @classmethod
    def parse(cls, entries: list[str]) -> AllowList:
        hosts: set[str] = set()
        networks: list[IPNetwork] = []
        for entry in entries:
            try:
                networks.append(ipaddress.ip_network(entry, strict=False))
            except ValueError:
                hosts.add(entry.lower().rstrip("."))
        return cls(frozenset(hosts), tuple(networks))

    def names(self, host: str) -> bool:
        return host in self.hosts

    def covers(self, address: IPAddress) -> bool:
        return any(address in network for network in self.networks)


@dataclass(frozen=True, slots=True)
class Target:
    """A checked webhook URL: where to connect, and what to call the host there."""

    scheme: str
    host: str
    port: int
    path: str
    """Path and query, as sent in the request line."""
    addresses: tuple[IPAddress, ...]

    @property
    def host_header(self) -> str:
        default = 443 if self.scheme == "https" else 80
        name = f"[{self.host}]" if ":" in self.host else self.host
        return name if self.port == default else f"{name}:{self.port}"

    def url_at(self, address: IPAddress) -> str:
        """The URL with `address` in place of the host name (the connection goes there)."""
        literal = f"[{address}]" if address.version == 6 else str(address)
        return f"{self.scheme}://{literal}:{self.port}{self.path}"


def public(address: IPAddress) -> bool:
    """Whether `address` is one a webhook may reach without being allow-listed."""
    if isinstance(address, ipaddress.IPv6Address) and address.ipv4_mapped is not None:
        address = address.ipv4_mapped
    return not (
        address.is_loopback
        or address.is_link_local
        or address.is_private
        or address.is_multicast
        or address.is_unspecified
        or address.is_reserved
        or address in _CGNAT
        or not address.is_global
    )


_CGNAT = ipaddress.ip_network("100.64.0.0/10")


def _refuse(message: str) -> WebhookUrlRefused:
    return WebhookUrlRefused(message, field=FIELD)


def parse_url(url: str, allow: AllowList) -> tuple[str, str, int, str]:
    """Scheme, host, port and path of `url`, or `WebhookUrlRefused` for a URL of a kind this
    service never calls (checked before any DNS lookup)."""
    if len(url.encode("utf-8", "surrogatepass")) > MAX_WEBHOOK_URL_BYTES:
        raise _refuse(f"the webhook URL is over {MAX_WEBHOOK_URL_BYTES} bytes")
    try:
        parts = urlsplit(url)
        port = parts.port
    except ValueError as exc:
        raise _refuse(f"the webhook URL is not a valid URL: {exc}") from None
    host = (parts.hostname or "").rstrip(".")
    if parts.scheme not in ("https", "http") or not host:
        raise _refuse("the webhook URL must be an https:// URL with a host")
    if parts.username is not None or parts.password is not None:
        raise _refuse("the webhook URL must not carry credentials")
    if parts.scheme == "http" and not _allow_listed_name(host, allow):
        raise _refuse("the webhook URL must be https (plain http only for allow-listed hosts)")
    path = parts.path or "/"
    if parts.query:
        path = f"{path}?{parts.query}"
    return parts.scheme, host, port or (443 if parts.scheme == "https" else 80), path


def _allow_listed_name(host: str, allow: AllowList) -> bool:
    if allow.names(host):
        return True
    try:
        return allow.covers(ipaddress.ip_address(host))
    except ValueError:
        return False


async def check_url(url: str, allow: AllowList) -> Target:
    """Resolve and check `url`; the `Target` to connect to, or `WebhookUrlRefused`.

    Every resolved address must pass (one private answer among public ones is refused: a
    client could otherwise race the resolver's order)."""
    scheme, host, port, path = parse_url(url, allow)
    addresses = await resolve(host, port)
    named = allow.names(host)
    for address in addresses:
        if not (named or allow.covers(address) or public(address)):
            raise _refuse(
                f"the webhook host {host!r} resolves to {address}, a private, loopback, "
                "link-local, multicast or reserved address (FLOW_WEBHOOK_ALLOW_HOSTS can allow it)"
            )
    return Target(scheme, host, port, path, addresses)


async def resolve(host: str, port: int) -> tuple[IPAddress, ...]:
    """Every address `host` resolves to, in the resolver's order (an IP literal: itself)."""
    try:
        return (ipaddress.ip_address(host),)
    except ValueError:
        pass
    loop = asyncio.get_running_loop()
    try:
        async with asyncio.timeout(RESOLVE_TIMEOUT_S):
            infos = await loop.getaddrinfo(host, port, type=socket.SOCK_STREAM)
    except TimeoutError:
        raise _refuse(f"the webhook host {host!r} did not resolve within 5 s") from None
    except (OSError, UnicodeError) as exc:
        raise _refuse(f"the webhook host {host!r} does not resolve: {exc}") from None
    found: dict[IPAddress, None] = {}
    for _family, _type, _proto, _name, sockaddr in infos:
        found[ipaddress.ip_address(str(sockaddr[0]).split("%", 1)[0])] = None
    if not found:
        raise _refuse(f"the webhook host {host!r} has no address")
    return tuple(found)
