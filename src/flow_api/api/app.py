"""The application factory: the lifespan owns the Redis pool, the queue and the providers."""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI

from flow_api.api.auth import AuthenticateFirst
from flow_api.api.errors import install_error_handlers
from flow_api.api.limits import UPLOAD_OVERHEAD_BYTES, BodySizeLimit
from flow_api.api.routes import (
    batches,
    files,
    generate,
    health,
    jobs,
    listing,
    metrics,
    stream,
    usage,
)
from flow_api.api.security import allowed_hosts, install_security
from flow_api.auth.access import AccessControl
from flow_api.auth.exposure import check_exposure
from flow_api.batch.driver import BatchDriver
from flow_api.batch.files import FileStore
from flow_api.batch.store import BatchStore
from flow_api.idempotency import IdempotencyStore
from flow_api.listing import JobIndex
from flow_api.observability.metrics import configure_labels
from flow_api.observability.usage import PriceTable
from flow_api.providers import ProviderRegistry, build_registry
from flow_api.queue.admission import Admission
from flow_api.queue.connection import connect
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
            configure_labels(settings, providers)
            app.state.idempotency = IdempotencyStore(
                queue.redis, settings.redis.queue_name, settings.api.idempotency_ttl_s
            )
            app.state.access = AccessControl(
                settings.auth,
                queue.redis,
                settings.redis.queue_name,
                PriceTable(settings.usage),
            )
            # Batches (issue 16): files need a client that answers bytes; every API process
            # runs a driver that takes over batch work any other process left unfinished.
            file_client = connect(settings.redis, decode=False)
            app.state.files = FileStore(
                file_client,
                settings.redis.queue_name,
                settings.batch.chunk_bytes,
                settings.worker.retention_s,
            )
            app.state.batches = BatchStore(
                queue, settings.worker.retention_s, settings.batch.reconcile_s
            )
            driver = BatchDriver(
                settings,
                queue,
                app.state.batches,
                app.state.files,
                app.state.store,
                providers,
                app.state.access,
                app.state.admission,
            )
            app.state.batch_driver = driver
            driving = asyncio.create_task(driver.run(), name="batch-driver")
            app.state.webhooks = Subscriptions(queue.redis, settings.redis, settings.webhook)
            try:
                yield
            finally:
                driving.cancel()
                with contextlib.suppress(asyncio.CancelledError):
                    await driving
                await file_client.aclose()
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
        # A batch file is far larger than a prompt: its own size limit, and a minute a 10 MB.
        uploads=(
            files.UPLOAD_PATH,
            settings.batch.max_file_bytes + UPLOAD_OVERHEAD_BYTES,
            max(settings.api.body_timeout_s, settings.batch.max_file_bytes / 170_000),
        ),
    )
    app.add_middleware(AuthenticateFirst)  # outside the body limit: a 401 reads no body
    install_security(app, settings.auth, allowed_hosts(settings))
    for module in (generate, jobs, stream, listing, health, usage, files, batches):
        app.include_router(module.router)
    if settings.metrics.enabled:
        app.include_router(metrics.router)
    return app
