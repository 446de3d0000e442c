"""Who a request acts as, and the rule that a job is visible only to its own tenant."""

from __future__ import annotations

import re
from dataclasses import dataclass
from enum import StrEnum

from flow_api.errors import InvalidRequest, JobNotFound
from flow_api.jobs import DEFAULT_TENANT
from flow_api.queue.store import StoredJob

_TENANT_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9._-]{0,63}")


class Scope(StrEnum):
    """What a key may do. `admin` implies the others (within its own tenant)."""

    SUBMIT = "submit"  # submit and cancel jobs
    READ = "read"  # status, result and record of jobs
    ADMIN = "admin"


ALL_SCOPES = frozenset(Scope)


@dataclass(frozen=True, slots=True)
class Principal:
    """The caller of one request: a tenant, what it may do, and its key's limits.

    `key_id` is None while authentication is off; limits of 0 mean unlimited.
    """

    tenant: str
    scopes: frozenset[Scope]
    key_id: str | None = None
    requests_per_minute: int = 0
    tokens_per_day: int = 0
    spend_per_day: float = 0
    """The key's spend cap per quota window, in the price table's currency (0: none)."""

    def allows(self, scope: Scope) -> bool:
        return scope in self.scopes or Scope.ADMIN in self.scopes


ANONYMOUS = Principal(tenant=DEFAULT_TENANT, scopes=ALL_SCOPES)
"""Every request while authentication is off."""


def ensure_owner(job: StoredJob, principal: Principal) -> StoredJob:
    """Return `job` if `principal`'s tenant submitted it; otherwise raise the very `JobNotFound`
    an unknown id gets, so a job id reveals nothing about other tenants' jobs."""
    if job.data.tenant != principal.tenant:
        raise JobNotFound(job.id)
    return job


def check_tenant_name(tenant: str) -> str:
    """Tenant names appear in Redis key names: letters, digits, `.`, `_`, `-`; at most 64."""
    if not _TENANT_NAME.fullmatch(tenant):
        raise InvalidRequest(
            f"tenant {tenant!r} must be 1 to 64 letters, digits, '.', '_' or '-', "
            "starting with a letter or digit",
            field="tenant",
        )
    return tenant
