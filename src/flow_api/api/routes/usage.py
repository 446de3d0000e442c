"""`GET /api/ai/usage`: the caller's tenant's tokens and cost over a range of UTC days."""

from __future__ import annotations

import re
from datetime import date, timedelta
from typing import Annotated, Any, Literal

from fastapi import APIRouter, Query, Request
from pydantic import BeforeValidator

from flow_api.api.auth import ReaderDep
from flow_api.api.deps import SettingsDep
from flow_api.api.responses import errors
from flow_api.errors import InvalidRequest
from flow_api.models import UsageGroup, UsageReport
from flow_api.observability.usage import MICROS, UsageLedger, UsageLine, today

router = APIRouter(prefix="/api/ai", tags=["usage"])

MAX_DAYS = 366
DEFAULT_DAYS = 30
_ISO_DAY = re.compile(r"\d{4}-\d{2}-\d{2}")


def _iso_day(value: Any) -> Any:
    # pydantic would also read a number as a Unix time ("0" as 1970-01-01): days are
    # YYYY-MM-DD only, as the schema says.
    if isinstance(value, str) and not _ISO_DAY.fullmatch(value):
        raise ValueError("expected a day as YYYY-MM-DD")
    return value


Day = Annotated[date | None, BeforeValidator(_iso_day)]


@router.get(
    "/usage",
    response_model=UsageReport,
    response_model_exclude_none=True,
    responses=errors(401, 403, 422, 503),
    summary="Tokens and cost of the tenant's completed jobs, by model or by API key",
)
async def usage(
    request: Request,
    settings: SettingsDep,
    principal: ReaderDep,
    first: Annotated[Day, Query(alias="from", description="first UTC day")] = None,
    last: Annotated[Day, Query(alias="to", description="last UTC day")] = None,
    group_by: Annotated[Literal["model", "key"], Query(alias="groupBy")] = "model",
) -> UsageReport:
    """Days are UTC, both ends included; `to` defaults to today and `from` to 29 days before
    `to`; at most 366 days. Costs are in `currency` at the deployment's price table."""
    last = last or today()
    first = first or last - timedelta(days=DEFAULT_DAYS - 1)
    if first > last:
        raise InvalidRequest("`from` is after `to`", field="from")
    if (last - first).days >= MAX_DAYS:
        raise InvalidRequest(f"the range is over {MAX_DAYS} days", field="from")
    redis = request.app.state.queue.redis
    ledger = UsageLedger(redis, settings.redis.queue_name, settings.usage.retention_days)
    lines = await ledger.totals(principal.tenant, first, last, group_by)
    total = UsageLine(
        "total",
        sum(line.jobs for line in lines),
        sum(line.prompt_tokens for line in lines),
        sum(line.completion_tokens for line in lines),
        sum(line.cost_micros for line in lines),
    )
    return UsageReport(
        tenant=principal.tenant,
        first=first,
        last=last,
        group_by=group_by,
        currency=settings.usage.currency,
        groups=[_group(line) for line in lines],
        total=_group(total),
    )


def _group(line: UsageLine) -> UsageGroup:
    return UsageGroup(
        name=line.group,
        jobs=line.jobs,
        prompt_tokens=line.prompt_tokens,
        completion_tokens=line.completion_tokens,
        total_tokens=line.prompt_tokens + line.completion_tokens,
        cost=line.cost_micros / MICROS,
    )
