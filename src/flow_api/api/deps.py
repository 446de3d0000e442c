"""Dependency aliases: routes receive the resources the lifespan owns.

Every dependency is `async def`, even when it awaits nothing: FastAPI runs a plain `def`
dependency in its thread pool, and the thread hops of a handful of them per request took more
CPU on the submit path than validating and queueing the job (see docs/performance.md).
"""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from flow_api.idempotency import IdempotencyStore
from flow_api.providers import ProviderRegistry
from flow_api.queue import JobQueue
from flow_api.settings import Settings


async def _queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


async def _registry(request: Request) -> ProviderRegistry:
    registry: ProviderRegistry = request.app.state.registry
    return registry


async def _idempotency(request: Request) -> IdempotencyStore:
    store: IdempotencyStore = request.app.state.idempotency
    return store


async def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


QueueDep = Annotated[JobQueue, Depends(_queue)]
RegistryDep = Annotated[ProviderRegistry, Depends(_registry)]
SettingsDep = Annotated[Settings, Depends(_settings)]
IdempotencyDep = Annotated[IdempotencyStore, Depends(_idempotency)]
