"""Liveness and readiness."""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter

from flow_api.api.deps import AdmissionDep, QueueDep, RegistryDep
from flow_api.api.responses import errors
from flow_api.errors import NoProviderAvailable

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get(
    "/readyz",
    summary="Redis is reachable and has room for jobs, and a provider can serve (503 when not)",
    responses=errors(503),
)
async def readyz(queue: QueueDep, registry: RegistryDep, admission: AdmissionDep) -> dict[str, Any]:
    """`degraded`, naming each provider that cannot serve and its fix, while others still can:
    the API and those providers keep taking traffic, so this stays a 200. 503 `queue_full`
    while admission control refuses new jobs (the same reading submits use)."""
    await queue.ping()
    if (refusal := await admission.refusal()) is not None:
        raise refusal
    problems = {
        name: problem
        for name, provider in registry.providers.items()
        if (problem := provider.health_problem()) is not None
    }
    if not problems:
        return {"status": "ready"}
    if len(problems) == len(registry.providers):
        raise NoProviderAvailable("no provider can serve: " + "; ".join(problems.values()))
    return {"status": "degraded", "unavailable": problems}
