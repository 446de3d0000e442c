"""Liveness and readiness."""

from __future__ import annotations

from fastapi import APIRouter

from flow_api.api.deps import QueueDep
from flow_api.api.responses import errors

router = APIRouter(tags=["health"])


@router.get("/healthz", summary="The process is alive")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz", summary="Redis is reachable (503 when not)", responses=errors(503))
async def readyz(queue: QueueDep) -> dict[str, str]:
    await queue.ping()
    return {"status": "ready"}
