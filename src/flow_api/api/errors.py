"""One table from domain errors to HTTP answers; every error body is `{"error": {code, ...}}`."""

from __future__ import annotations

import logging
import sys
from collections.abc import Mapping
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.routing import Match

from flow_api.api.security import API_HEADERS
from flow_api.errors import FlowError, QueueFull, QueueUnavailable
from flow_api.models import ErrorBody, ErrorPayload
from flow_api.observability.metrics import METRICS
from flow_api.queue.connection import RedisOutOfMemory, out_of_memory

REDIS_OOM = "redis_out_of_memory"

log = logging.getLogger(__name__)

_HTTP_CODES = {
    400: ("invalid_json", "the body could not be read as UTF-8 JSON"),
    404: ("not_found", "no such endpoint"),
    405: ("method_not_allowed", "this endpoint does not accept that method"),
    408: ("request_timeout", "the request body did not arrive in time"),
    413: ("payload_too_large", "the request body is too large"),
}


def error_response(
    status: int,
    code: str,
    message: str,
    extra: dict[str, Any] | None = None,
    headers: Mapping[str, str] | None = None,
) -> JSONResponse:
    """The one shape of every error answer: `ErrorBody`, `{"error": {"code", "message", ...}}`."""
    body = ErrorBody(error=ErrorPayload(code=code, message=message, **(extra or {})))
    return JSONResponse(body.wire(), status_code=status, headers=headers)


def _field(loc: tuple[Any, ...]) -> str:
    parts = [str(p) for p in loc if p != "body"]
    return ".".join(parts) or "body"


def _explain(err: dict[str, Any]) -> tuple[str, str]:
    """A stable code and a person-readable sentence for one pydantic error."""
    kind, field = err.get("type", ""), _field(tuple(err.get("loc", ())))
    if kind == "json_invalid":
        return "invalid_json", "the body is not valid JSON"
    if kind == "missing":
        return "missing_field", f"{field} is required"
    if kind == "extra_forbidden":
        return "unknown_field", f"{field} is not a known field"
    if kind in ("model_attributes_type", "model_type", "dict_type"):
        code = "invalid_body" if field == "body" else "invalid_type"
        return code, f"{field} must be a JSON object"
    if field == "body":
        return "invalid_body", f"the body is not acceptable: {err.get('msg', '')}"
    if kind.endswith("_type") or kind.endswith("_parsing"):
        return "invalid_type", f"{field}: {err.get('msg', 'wrong type')}"
    return "invalid_value", f"{field}: {err.get('msg', 'invalid value')}"


async def _validation(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = list(exc.errors())
    first = errors[0] if errors else {}
    body_sent = first.get("type") != "missing"
    if body_sent and _field(tuple(first.get("loc", ()))) == "body" and not _json(request):
        # FastAPI parses JSON only when the Content-Type says JSON; otherwise a body sent is
        # seen as bytes, "not an object". Accepting JSON sent as text/plain would let any web
        # page submit jobs to a loopback API without a CORS preflight (a "simple" request).
        return error_response(
            415,
            "unsupported_media_type",
            "send the body as JSON with `Content-Type: application/json` (this request's "
            f"Content-Type: {request.headers.get('content-type', 'none')[:100]!r})",
        )
    code, message = _explain(errors[0]) if errors else ("invalid_request", "invalid request")
    status = 400 if code in ("invalid_json",) else 422
    details = [
        {
            "field": _field(tuple(e.get("loc", ()))),
            "code": _explain(e)[0],
            "message": _explain(e)[1],
        }
        for e in errors[:20]
    ]
    return error_response(status, code, message, {"details": details})


async def _flow(_: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, FlowError)
    if isinstance(exc, QueueUnavailable) or getattr(exc, "reason", None) == REDIS_OOM:
        METRICS.redis_errors.labels("api").inc()
    return flow_error_response(exc)


def flow_error_response(exc: FlowError, headers: Mapping[str, str] | None = None) -> JSONResponse:
    """The answer for a domain error, with the headers it carries (and any in `headers`)."""
    if isinstance(exc, QueueFull):  # admission logs when it closes and reopens, with counts
        log.debug("%s: %s", exc.code, exc.message)
    elif exc.status >= 500:
        log.warning("%s: %s", exc.code, exc.message)
    sent = {"Retry-After": "1"} if exc.status == 503 else {}
    sent.update(exc.headers())  # Retry-After of a 429, WWW-Authenticate of a 401
    sent.update(headers or {})
    extra = {k: v for k, v in exc.to_dict().items() if k not in ("code", "message")}
    return error_response(exc.status, exc.code, exc.message, headers=sent, extra=extra or None)


async def _out_of_memory(request: Request, exc: Exception) -> JSONResponse:
    # A Redis write refused for memory anywhere in a request (the job, a quota, an idempotency
    # key): the same 503 `queue_full` admission control gives, never an "unexpected error".
    return await _flow(request, out_of_memory())


async def _http(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code, message = _HTTP_CODES.get(exc.status_code, ("http_error", str(exc.detail)))
    if exc.status_code == 400 and _number_too_long(exc.__cause__):
        message = (
            "the body has a number too long to read: integers may have at most "
            f"{sys.get_int_max_str_digits()} digits (and fields have far smaller limits)"
        )
    elif exc.status_code == 408:
        message = str(exc.detail)
    headers = exc.headers
    if exc.status_code == 405:  # Starlette names only the first matching route's methods
        headers = {"Allow": ", ".join(_allowed_methods(request))}
    return error_response(exc.status_code, code, message, headers=headers)


def _json(request: Request) -> bool:
    kind = request.headers.get("content-type", "").split(";", 1)[0].strip().lower()
    return kind == "application/json" or (
        kind.startswith("application/") and kind.endswith("+json")
    )


def _number_too_long(cause: BaseException | None) -> bool:
    # FastAPI turns every error of `json.loads` other than a syntax error into a bare 400 (the
    # cause kept). Besides bytes that are not UTF-8, the one ValueError it raises on valid JSON
    # is an integer past Python's digit limit (CVE-2020-10735's guard).
    return isinstance(cause, ValueError) and not isinstance(cause, UnicodeDecodeError)


def _allowed_methods(request: Request) -> list[str]:
    # Ask each method whether some route takes this path with it.
    allowed = []
    for method in ("GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"):
        scope = {**request.scope, "method": method}
        if any(r.matches(scope)[0] is Match.FULL for r in request.app.router.routes):
            allowed.append(method)
    return allowed


async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
    log.exception("unexpected error: %s", type(exc).__name__)
    # Starlette sends this answer outside every middleware: add the security headers here.
    return error_response(
        500, "internal_error", "an unexpected error occurred", headers=API_HEADERS
    )


def install_error_handlers(app: FastAPI) -> None:
    app.add_exception_handler(RequestValidationError, _validation)
    app.add_exception_handler(FlowError, _flow)
    app.add_exception_handler(RedisOutOfMemory, _out_of_memory)
    app.add_exception_handler(StarletteHTTPException, _http)
    app.add_exception_handler(Exception, _unexpected)
