"""Dependency aliases: routes receive the resources the lifespan owns (on `app.state`).

Every dependency is `async def`, even though it awaits nothing: FastAPI runs a plain `def`
dependency in its thread pool, and the thread hops of a handful of them per request took more
CPU on the submit path than validating and queueing the job (see docs/performance.md).
"""

from __future__ import annotations

from collections.abc import Awaitable, Callable
from typing import Annotated, Any

from fastapi import Depends, Request

from flow_api.idempotency import IdempotencyStore
from flow_api.providers import ProviderRegistry
from flow_api.queue.admission import Admission
from flow_api.queue.producer import JobQueue
from flow_api.queue.store import JobStore
from flow_api.settings import Settings
from flow_api.webhooks.subscriptions import Subscriptions


def _state(name: str) -> Callable[[Request], Awaitable[Any]]:
    """A dependency returning `app.state.<name>`, set by the lifespan in `api/app.py`."""

    async def dependency(request: Request) -> Any:
        return getattr(request.app.state, name)

    return dependency


QueueDep = Annotated[JobQueue, Depends(_state("queue"))]
StoreDep = Annotated[JobStore, Depends(_state("store"))]
RegistryDep = Annotated[ProviderRegistry, Depends(_state("registry"))]
SettingsDep = Annotated[Settings, Depends(_state("settings"))]
AdmissionDep = Annotated[Admission, Depends(_state("admission"))]
IdempotencyDep = Annotated[IdempotencyStore, Depends(_state("idempotency"))]
WebhooksDep = Annotated[Subscriptions, Depends(_state("webhooks"))]
