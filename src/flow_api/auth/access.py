"""`AccessControl`: from a request's `Authorization` header to a `Principal`, and the per-key
limits a submit must pass (requests per window, then tokens per day)."""

from __future__ import annotations

import asyncio
import contextlib
import logging

from redis.asyncio import Redis

from flow_api.auth.api_keys import ApiKey, ApiKeyStore
from flow_api.auth.principal import ANONYMOUS, Principal
from flow_api.auth.quota import TokenQuota
from flow_api.auth.rate import SubmitRateLimiter
from flow_api.auth.spend import SpendCap
from flow_api.errors import FlowError, QueueUnavailable, Unauthorized
from flow_api.jobs import Charge, JobData, quota_bound
from flow_api.models import GenerateRequest
from flow_api.observability.usage import PriceTable, reserve_micros
from flow_api.settings import AuthSettings

log = logging.getLogger(__name__)

REFUND_RETRIES_S = (0.5, 1.0, 2.0, 4.0, 8.0, 15.0)


class AccessControl:
    """Authentication and per-key limits for one API process. Holds no state of its own but
    the refunds it is still retrying."""

    def __init__(
        self,
        settings: AuthSettings,
        redis: Redis,
        queue_name: str,
        prices: PriceTable | None = None,
    ) -> None:
        self.settings = settings
        self.prices = prices
        currency = prices.currency if prices is not None else ""
        self.spend = SpendCap(redis, queue_name, settings.quota_window_s, currency)
        self.keys = ApiKeyStore(redis, queue_name)
        self.rate = SubmitRateLimiter(redis, queue_name, settings.rate_window_s)
        self.quota = TokenQuota(redis, queue_name, settings.quota_window_s)
        self._refunds: set[asyncio.Task[None]] = set()

    async def authenticate(self, authorization: str | None) -> Principal:
        """The caller, or `Unauthorized`. While auth is off, everyone is `ANONYMOUS`."""
        if not self.settings.enabled:
            return ANONYMOUS
        if not authorization:
            raise Unauthorized("send an API key: `Authorization: Bearer <key>`")
        scheme, _, token = authorization.strip().partition(" ")
        if scheme.lower() != "bearer" or not token.strip():
            raise Unauthorized("the Authorization header must be `Bearer <key>`")
        key = await self.keys.find(token.strip())
        if key is None:
            raise Unauthorized("the API key is not valid (unknown, revoked or expired)")
        return self.principal_of(key)

    def principal_of(self, key: ApiKey) -> Principal:
        rpm, tpd, spend = key.requests_per_minute, key.tokens_per_day, key.spend_per_day
        return Principal(
            tenant=key.tenant,
            scopes=key.scopes,
            key_id=key.id,
            requests_per_minute=self.settings.requests_per_minute if rpm is None else rpm,
            tokens_per_day=self.settings.tokens_per_day if tpd is None else tpd,
            spend_per_day=self.settings.spend_per_day if spend is None else spend,
        )

    async def admit_submit(self, principal: Principal) -> None:
        """Count a submit against the key's request rate; raises `RateLimited`."""
        await self.rate.hit(principal)

    async def reserve_tokens(
        self, principal: Principal, request: GenerateRequest, job_id: str
    ) -> Charge | None:
        """Reserve the most the request may spend (`quota_bound`; raises `QuotaExhausted` before
        anything is queued) for job `job_id`; returns the reservation the job carries
        (`JobData.charge`) to its worker. When Redis is lost mid-call the reservation may have
        been made: it is refunded (in the background, once Redis answers)."""
        completion = request.options.max_tokens or self.settings.estimate_completion_tokens
        tokens = quota_bound(request, self.settings.estimate_completion_tokens)
        try:
            return await self.quota.reserve(principal, tokens, job_id, completion)
        except QueueUnavailable:
            self._refund_soon(self.quota.charge_for(principal, tokens, completion), job_id)
            raise

    async def reserve_spend(
        self, principal: Principal, request: GenerateRequest, job: JobData, job_id: str
    ) -> Charge | None:
        """Reserve the most the job may cost against the key's spend cap (`SpendCap`; raises
        `SpendCapReached`): its `quota_bound` tokens at its model's price. None: no cap, or
        a model that costs nothing."""
        if self.prices is None or principal.spend_per_day <= 0 or principal.key_id is None:
            return None
        completion = request.options.max_tokens or self.settings.estimate_completion_tokens
        prompt = quota_bound(request, self.settings.estimate_completion_tokens) - completion
        micros = reserve_micros(
            self.prices, job.provider or "", job.model or "", prompt, completion
        )
        return await self.spend.reserve(principal, micros, job_id)

    async def refund_spend(self, charge: Charge | None, job_id: str) -> None:
        """Give back a spend reservation whose job was not queued (best effort: the entry
        expires with its window)."""
        if charge is not None:
            with contextlib.suppress(FlowError):
                await self.spend.settle(charge, 0, job_id)

    async def refund(self, charge: Charge | None, job_id: str) -> None:
        """Return a reservation whose job was not queued. When Redis is away (usually why the
        job was not queued) it is retried in the background for about 30 s; the settle is per
        job, so a refund of a job that was queued after all is corrected by its worker."""
        if charge is None:
            return
        try:
            await self.quota.settle(charge, 0, job_id)
        except FlowError:
            self._refund_soon(charge, job_id)

    def _refund_soon(self, charge: Charge, job_id: str) -> None:
        task = asyncio.create_task(self._refund_later(charge, job_id))
        self._refunds.add(task)
        task.add_done_callback(self._refunds.discard)

    async def _refund_later(self, charge: Charge, job_id: str) -> None:
        for delay_s in REFUND_RETRIES_S:
            await asyncio.sleep(delay_s)
            with contextlib.suppress(FlowError):
                await self.quota.settle(charge, 0, job_id)
                return
        log.warning(
            "key %s: %d reserved tokens of an unqueued job not refunded (Redis unreachable)",
            charge.key_id,
            charge.tokens,
        )
