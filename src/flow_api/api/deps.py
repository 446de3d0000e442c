"""Dependency aliases: routes receive the resources the lifespan owns."""

from __future__ import annotations

from typing import Annotated

from fastapi import Depends, Request

from flow_api.idempotency import IdempotencyStore
from flow_api.providers import ProviderRegistry
from flow_api.queue import JobQueue
from flow_api.settings import Settings


def _queue(request: Request) -> JobQueue:
    queue: JobQueue = request.app.state.queue
    return queue


def _registry(request: Request) -> ProviderRegistry:
    registry: ProviderRegistry = request.app.state.registry
    return registry


def _idempotency(request: Request) -> IdempotencyStore:
    store: IdempotencyStore = request.app.state.idempotency
    return store


def _settings(request: Request) -> Settings:
    settings: Settings = request.app.state.settings
    return settings


QueueDep = Annotated[JobQueue, Depends(_queue)]
RegistryDep = Annotated[ProviderRegistry, Depends(_registry)]
SettingsDep = Annotated[Settings, Depends(_settings)]
IdempotencyDep = Annotated[IdempotencyStore, Depends(_idempotency)]
