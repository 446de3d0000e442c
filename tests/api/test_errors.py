"""The one error table: every domain error becomes its HTTP status and an `ErrorBody`."""

from __future__ import annotations

import httpx
import pytest

from flow_api import errors
from flow_api.api.app import create_app
from flow_api.models import ErrorBody
from flow_api.settings import Settings


def all_errors() -> list[type[errors.FlowError]]:
    found: list[type[errors.FlowError]] = []
    pending: list[type[errors.FlowError]] = [errors.FlowError]
    while pending:
        kind = pending.pop()
        found.append(kind)
        pending.extend(kind.__subclasses__())
    return found


def instance(kind: type[errors.FlowError]) -> errors.FlowError:
    if issubclass(kind, errors.JobNotFound):
        return kind("abc")
    if issubclass(kind, errors.RateLimited):
        return kind("slow down", retry_after=2.5)
    if issubclass(kind, errors.QueueFull):
        return kind("no room", reason="redis_memory", retry_after=5)
    return kind("it went wrong")


@pytest.mark.parametrize("kind", all_errors(), ids=lambda k: k.__name__)
async def test_each_domain_error_has_its_status_code_and_body(
    settings: Settings, kind: type[errors.FlowError]
) -> None:
    app = create_app(settings)
    error = instance(kind)

    async def fail() -> None:
        raise error

    app.add_api_route("/fail", fail)
    transport = httpx.ASGITransport(app=app)
    async with httpx.AsyncClient(transport=transport, base_url="http://localhost") as client:
        answer = await client.get("/fail")
    assert answer.status_code == kind.status
    body = ErrorBody.model_validate(answer.json())
    assert (body.error.code, body.error.message) == (kind.code, error.message)
    if kind.status in (429, 503):
        assert int(answer.headers["Retry-After"]) >= 1
    if kind.status == 401:
        assert answer.headers["WWW-Authenticate"].startswith("Bearer")


def test_retryable_errors_are_the_transient_ones() -> None:
    retryable = {k.__name__ for k in all_errors() if k.retryable}
    assert retryable == {
        "QueueUnavailable",
        "QueueFull",
        "RateLimited",
        "QuotaExhausted",
        "SpendCapReached",
        "WorkerFault",
        "ProviderTimeout",
        "ProviderUnavailable",
        "ProviderRateLimited",
        "LocalModelCrashed",
        "LocalModelUnavailable",
    }
