"""The application factory: the lifespan owns the Redis pool, the queue and the providers."""

from __future__ import annotations

from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from flow_api.api.auth import AuthenticateFirst
from flow_api.api.errors import install_error_handlers
from flow_api.api.limits import BodySizeLimit
from flow_api.api.routes import generate, health, jobs, listing, stream
from flow_api.api.security import allowed_hosts, install_security
from flow_api.auth.access import AccessControl
from flow_api.auth.exposure import check_exposure
from flow_api.idempotency import IdempotencyStore
from flow_api.listing import JobIndex
from flow_api.providers import ProviderRegistry, build_registry
from flow_api.queue.admission import Admission
from flow_api.queue.producer import job_queue
from flow_api.queue.store import JobStore
from flow_api.settings import Settings
from flow_api.streaming.reader import JobStreams
from flow_api.webhooks.subscriptions import Subscriptions


def create_app(settings: Settings, registry: ProviderRegistry | None = None) -> FastAPI:
    """Build the API. Nothing connects until the lifespan starts. Raises `InsecureBinding`
    when it would serve beyond loopback without authentication."""
    check_exposure(settings)

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        providers = registry or build_registry(settings)
        async with job_queue(settings.redis, settings.worker) as queue:
            app.state.settings = settings
            app.state.queue = queue
            app.state.store = store = JobStore(queue)
            app.state.streams = JobStreams(store, settings)
            app.state.index = JobIndex(queue.redis, settings)
            app.state.admission = Admission(queue, settings.admission)
            app.state.registry = providers
            app.state.idempotency = IdempotencyStore(
                queue.redis, settings.redis.queue_name, settings.api.idempotency_ttl_s
            )
            app.state.access = AccessControl(settings.auth, queue.redis, settings.redis.queue_name)
            app.state.webhooks = Subscriptions(queue.redis, settings.redis, settings.webhook)
            try:
                yield
            finally:
                if registry is None:
                    await providers.aclose()

    app = FastAPI(
        title="Flow API",
        version="0.1.0",
        summary="Asynchronous LLM jobs: submit a prompt, poll its status and result.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(
        BodySizeLimit,
        max_bytes=settings.api.max_body_bytes,
        timeout_s=settings.api.body_timeout_s,
    )
    app.add_middleware(AuthenticateFirst)  # outside the body limit: a 401 reads no body
    install_security(app, settings.auth, allowed_hosts(settings))
    for module in (generate, jobs, stream, listing, health):
        app.include_router(module.router)
    return app
