"""The worker side of the token quota: each job's reservation is settled with its real usage.

A completed job's reservation becomes the provider's reported total (the estimate stands when a
provider reports none); a job that ends without a result is refunded, since providers do not
bill failed calls. A job handed back on shutdown keeps its reservation for the next attempt.
"""

from __future__ import annotations

import logging
from types import TracebackType
from typing import Any

from pydantic import ValidationError
from redis.asyncio import Redis

from flow_api.auth.quota import CHARGE_FIELD, Charge, TokenQuota
from flow_api.errors import FlowError
from flow_api.queue import Handler, JobHandle, connect
from flow_api.settings import Settings

log = logging.getLogger(__name__)


class UsageMeter:
    """Wraps a job handler to settle quotas. No connection until entered (`async with`)."""

    def __init__(self, settings: Settings) -> None:
        self.settings = settings
        self._redis: Redis | None = None
        self._quota: TokenQuota | None = None

    async def __aenter__(self) -> UsageMeter:
        self._redis = connect(self.settings.redis)
        self._quota = TokenQuota(
            self._redis, self.settings.redis.queue_name, self.settings.auth.quota_window_s
        )
        return self

    async def __aexit__(
        self,
        exc_type: type[BaseException] | None,
        exc: BaseException | None,
        tb: TracebackType | None,
    ) -> None:
        redis, self._redis, self._quota = self._redis, None, None
        if redis is not None:
            await redis.aclose()

    def metered(self, handler: Handler) -> Handler:
        """`handler`, settling the job's token reservation once its outcome is final."""

        async def run(job: JobHandle) -> dict[str, Any]:
            try:
                result = await handler(job)
            except Exception as exc:
                retried = not isinstance(exc, FlowError) or exc.retryable
                if not (retried and job.attempt < job.max_attempts):
                    await self._settle(job, 0)
                raise
            await self._settle(job, _total_tokens(result))
            return result

        return run

    async def _settle(self, job: JobHandle, used: int | None) -> None:
        charge = _charge_of(job.data)
        if charge is None or self._quota is None:
            return
        try:
            await self._quota.settle(charge, charge.tokens if used is None else used)
        except FlowError as exc:  # the job's outcome matters more than the ledger
            log.warning("job %s: token usage not recorded: %s", job.id, exc.code)


def _charge_of(data: dict[str, Any]) -> Charge | None:
    raw = data.get(CHARGE_FIELD)
    if not isinstance(raw, dict):
        return None
    try:
        return Charge.model_validate(raw)
    except ValidationError:
        return None


def _total_tokens(result: dict[str, Any]) -> int | None:
    usage = result.get("usage")
    total = usage.get("totalTokens") if isinstance(usage, dict) else None
    return total if isinstance(total, int) and total > 0 else None
