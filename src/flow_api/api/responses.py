"""OpenAPI descriptions of the error answers, shared by the routes."""

from __future__ import annotations

from typing import Any

from flow_api.models import ErrorBody

_TEXT = {
    400: "the body is not JSON (`invalid_json`), or the request is not HTTP/1.1 "
    "(`malformed_request`)",
    401: "no valid API key (`unauthorized`), when authentication is on",
    403: "the key lacks the scope (`forbidden`)",
    404: "unknown or expired job (`job_not_found`)",
    409: "conflict; see `error.code`",
    408: "the body did not arrive within the body timeout (`request_timeout`)",
    413: "the body is over the size limit (`payload_too_large`)",
    415: "the body is not sent as `application/json` (`unsupported_media_type`)",
    422: "invalid input; `error.field` names it",
    429: "`rate_limited`, `quota_exhausted` or `spend_cap_reached` for this key; retry after "
    "`Retry-After`",
    503: "Redis is unreachable (`queue_unavailable`); retry after `Retry-After`",
}


def errors(*statuses: int, **overrides: str) -> dict[int | str, dict[str, Any]]:
    """`responses=` for these error statuses, each with the error body schema."""
    described = {int(k.removeprefix("s")): v for k, v in overrides.items()}
    return {
        status: {"model": ErrorBody, "description": described.get(status, _TEXT[status])}
        for status in statuses
    }
