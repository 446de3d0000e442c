"""The start-up guard: the API serves without keys only on loopback, unless told otherwise."""

from __future__ import annotations

import ipaddress
import logging

from flow_api.jobs import DEFAULT_TENANT
from flow_api.settings import Settings

log = logging.getLogger(__name__)


class InsecureBinding(RuntimeError):
    """Serving beyond loopback with authentication off, without the explicit override."""

    def __init__(self, host: str) -> None:
        super().__init__(
            f"refusing to serve on {host} without authentication: anyone who can reach it could "
            "read every job. Set FLOW_AUTH_ENABLED=true and create keys with "
            "`flow-api keys create --tenant TEAM --name NAME`, or, behind a gateway that "
            "authenticates for you, set FLOW_AUTH_ALLOW_UNAUTHENTICATED=true."
        )


def is_loopback(host: str) -> bool:
    if host.strip("[]").lower() == "localhost":
        return True
    try:
        return ipaddress.ip_address(host.strip("[]")).is_loopback
    except ValueError:
        return False


def refuse_insecure_binding(settings: Settings) -> None:
    """Raise `InsecureBinding` if serving on `settings.api.host` would expose unauthenticated
    jobs. Called where the address is bound (`listener.listen`), so every way of choosing it
    (`--host`, `FLOW_API_HOST`, `--reload`, `up`) meets the same guard."""
    auth, host = settings.auth, settings.api.host
    if not (auth.enabled or is_loopback(host) or auth.allow_unauthenticated):
        raise InsecureBinding(host)


def check_exposure(settings: Settings) -> None:
    """Raise `InsecureBinding`, or log how this API authenticates (one line at start-up)."""
    refuse_insecure_binding(settings)
    auth, host = settings.auth, settings.api.host
    if auth.enabled:
        log.info("authentication on: every API request needs `Authorization: Bearer <key>`")
    elif is_loopback(host):
        log.info(
            "authentication off: bound to loopback (%s), every request acts as tenant %r with "
            "all scopes; set FLOW_AUTH_ENABLED=true to require API keys",
            host,
            DEFAULT_TENANT,
        )
    else:
        log.warning(
            "authentication off on %s (FLOW_AUTH_ALLOW_UNAUTHENTICATED=true): whoever reaches "
            "this port can submit and read every job",
            host,
        )
