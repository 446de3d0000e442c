"""Usage and cost: the price table, a job's cost, and per-tenant daily totals kept in Redis.

Totals are counted as jobs complete, into one hash per tenant and UTC day
(`keys.usage_day_key`), by `provider/model` and by API key; `GET /api/ai/usage` reads one
hash per day of its range (a year at most), never the jobs themselves. Amounts are kept in
millionths of the currency, as integers (`HINCRBY`), so sums never drift.

A job that completes is counted once; one whose finish was lost after it was counted (a crash
or a lost Redis at that moment) runs again and is counted again, which is what it cost: the
provider was called, and paid, twice.
"""

from __future__ import annotations

import math
from collections import defaultdict
from collections.abc import Awaitable, Callable, Mapping
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from redis.asyncio import Redis

from flow_api.keys import usage_day_key
from flow_api.models import Cost, Usage
from flow_api.queue.connection import redis_errors_as_unavailable
from flow_api.settings import Price, UsageSettings

MICROS = 1_000_000
"""Stored amounts are in millionths of the currency. A price is per million tokens, so a
job's cost in millionths is simply tokens times price."""

METRICS = ("jobs", "prompt", "completion", "cost")
NO_KEY = "-"
"""The key of jobs submitted while authentication is off."""


class PriceTable:
    """Prices by `provider/model`, falling back to `provider/*`; unknown models cost 0."""

    def __init__(self, settings: UsageSettings) -> None:
        self.currency = settings.currency
        self.prices = settings.price_table()

    def price(self, provider: str, model: str) -> Price | None:
        return self.prices.get(f"{provider}/{model}") or self.prices.get(f"{provider}/*")

    def micros(self, provider: str, model: str, prompt: int, completion: int) -> float:
        """What `prompt` + `completion` tokens cost, in millionths of the currency."""
        price = self.price(provider, model)
        if price is None:
            return 0.0
        return prompt * price.input + completion * price.output

    def cost(self, provider: str, model: str, usage: Usage) -> Cost:
        micros = self.micros(provider, model, usage.prompt_tokens, usage.completion_tokens)
        return Cost(amount=round(micros) / MICROS, currency=self.currency)


@dataclass(frozen=True, slots=True)
class UsageLine:
    """One group's totals over a range of days."""

    group: str
    jobs: int
    prompt_tokens: int
    completion_tokens: int
    cost_micros: int


Pipelined = Callable[[Callable[[Any], None], int], Awaitable[list[Any]]]
"""Runs the commands a builder adds to a pipeline; their replies (`JobHandle.pipelined`)."""

RECORD_COMMANDS = 2 * len(METRICS) + 1


class UsageLedger:
    """Per-tenant daily usage totals in Redis: written by workers, read by the API."""

    def __init__(self, redis: Redis, queue_name: str, retention_days: int) -> None:
        self.redis = redis
        self.queue_name = queue_name
        self.ttl_s = retention_days * 86_400

    async def record(
        self,
        tenant: str,
        key_id: str | None,
        model: str,
        usage: Usage,
        cost: Cost | None,
        day: date | None = None,
        pipelined: Pipelined | None = None,
    ) -> None:
        """Add one completed job (`model` as `provider/model`) to its tenant's day, through
        `pipelined` (a worker's shared pipeline) or this ledger's own connection."""
        key = usage_day_key(self.queue_name, tenant, (day or today()).isoformat())
        micros = round((cost.amount if cost else 0) * MICROS)
        amounts = (1, usage.prompt_tokens, usage.completion_tokens, micros)

        def build(pipe: Any) -> None:
            for group in (f"m:{model}", f"k:{key_id or NO_KEY}"):
                for metric, amount in zip(METRICS, amounts, strict=True):
                    pipe.hincrby(key, f"{group}:{metric}", amount)
            pipe.expire(key, self.ttl_s)

        with redis_errors_as_unavailable():
            if pipelined is None:
                async with self.redis.pipeline(transaction=False) as pipe:
                    build(pipe)
                    replies = await pipe.execute(raise_on_error=False)
            else:
                replies = await pipelined(build, RECORD_COMMANDS)
            for reply in replies:
                if isinstance(reply, Exception):
                    raise reply

    async def totals(self, tenant: str, first: date, last: date, group_by: str) -> list[UsageLine]:
        """Totals per model (`group_by="model"`) or per key id (`"key"`), first to last day."""
        days = [first + timedelta(days=n) for n in range((last - first).days + 1)]
        with redis_errors_as_unavailable():
            async with self.redis.pipeline(transaction=False) as pipe:
                for day in days:
                    pipe.hgetall(usage_day_key(self.queue_name, tenant, day.isoformat()))
                hashes: list[Mapping[str, str]] = await pipe.execute()
        prefix = "m:" if group_by == "model" else "k:"
        sums: dict[str, dict[str, int]] = defaultdict(lambda: dict.fromkeys(METRICS, 0))
        for fields in hashes:
            for field, value in fields.items():
                if field.startswith(prefix):
                    group, _, metric = field[len(prefix) :].rpartition(":")
                    sums[group][metric] += int(value)
        return [
            UsageLine(g, s["jobs"], s["prompt"], s["completion"], s["cost"])
            for g, s in sorted(sums.items())
        ]


def today() -> date:
    return datetime.now(UTC).date()


def reserve_micros(
    table: PriceTable, provider: str, model: str, prompt: int, completion: int
) -> int:
    """The most a job may cost, in whole millionths (rounded up): what a spend cap reserves."""
    return math.ceil(table.micros(provider, model, prompt, completion))
