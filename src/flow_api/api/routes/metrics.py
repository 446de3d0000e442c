"""`GET /metrics`: this API process's metrics, with the queue's depth read at scrape time."""

from __future__ import annotations

import logging

from fastapi import APIRouter, Response
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from flow_api.api.deps import QueueDep, SettingsDep
from flow_api.errors import FlowError
from flow_api.observability.metrics import METRICS
from flow_api.queue.depth import queue_depth

router = APIRouter(tags=["metrics"])
log = logging.getLogger(__name__)


@router.get(
    "/metrics",
    summary="Prometheus metrics of this API process and the queue's depth by state",
    response_class=Response,
    responses={200: {"content": {CONTENT_TYPE_LATEST: {}}, "description": "text format 0.0.4"}},
)
async def metrics(queue: QueueDep, settings: SettingsDep) -> Response:
    """Unauthenticated, like `/healthz`: serve it to Prometheus only (see the README), or turn
    it off with `FLOW_METRICS_ENABLED=false` (no such route then). Redis unreachable: the
    queue gauges are left out and `flow_redis_errors_total{operation="scrape"}` counts it; the
    rest still answers."""
    METRICS.queue_jobs.clear()
    try:
        depth = await queue_depth(queue.redis, settings.redis)
    except FlowError:
        METRICS.redis_errors.labels("scrape").inc()
    else:
        for state, count in depth.items():
            METRICS.queue_jobs.labels(state).set(count)
    return Response(generate_latest(METRICS.registry), media_type=CONTENT_TYPE_LATEST)
