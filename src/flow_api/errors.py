"""Typed domain errors. Each carries a stable `code`, an HTTP status and a `retryable` flag.

Third-party errors are mapped to these where they enter (see `providers/sdk_errors.py`); retry
decisions and HTTP answers read these types, never message text.
"""

from __future__ import annotations

import math
from typing import Any, ClassVar


class FlowError(Exception):
    """Base of every error the service raises on purpose."""

    code: ClassVar[str] = "internal_error"
    status: ClassVar[int] = 500
    retryable: ClassVar[bool] = False

    def __init__(self, message: str, *, field: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.field = field

    def to_dict(self) -> dict[str, Any]:
        body: dict[str, Any] = {"code": self.code, "message": self.message}
        if self.field is not None:
            body["field"] = self.field
        return body

    def headers(self) -> dict[str, str]:
        """HTTP headers that belong with this error's answer (e.g. `Retry-After`)."""
        return {}


# --- request errors -------------------------------------------------------------------------


class InvalidRequest(FlowError):
    code = "invalid_request"
    status = 422


class InvalidJson(FlowError):
    code = "invalid_json"
    status = 400


class PayloadTooLarge(FlowError):
    code = "payload_too_large"
    status = 413


class ProviderNotConfigured(InvalidRequest):
    code = "provider_not_configured"


class ModelNotAllowed(InvalidRequest):
    code = "model_not_allowed"


class WebhookUrlRefused(InvalidRequest):
    """A webhook URL this service will not call: not https (outside the allow-list), too long,
    unresolvable, or resolving to a private, loopback, link-local or multicast address."""

    code = "webhook_url_refused"


class WebhookSecretMissing(InvalidRequest):
    """A webhook for a tenant that has no signing secret yet (an admin creates one)."""

    code = "webhook_secret_missing"


class JobNotFound(FlowError):
    code = "job_not_found"
    status = 404

    def __init__(self, job_id: str) -> None:
        super().__init__(f"no job with id {job_id!r} (it may have expired)")


class JobFailed(FlowError):
    """Asking for the result of a job that ended in failure."""

    code = "job_failed"
    status = 409


class JobAlreadyFinished(FlowError):
    """Cancelling a job that already completed, failed, expired or was cancelled."""

    code = "job_already_finished"
    status = 409


class IdempotencyConflict(FlowError):
    code = "idempotency_key_reused"
    status = 409


class IdempotencyInProgress(FlowError):
    """A replay of an `Idempotency-Key` whose first request has no outcome yet."""

    code = "idempotency_key_in_progress"
    status = 409

    def headers(self) -> dict[str, str]:
        return {"Retry-After": "1"}


class ReplayedError(FlowError):
    """The error an `Idempotency-Key`'s first request answered, answered again to a replay."""

    def __init__(
        self, message: str, *, field: str | None = None, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message, field=field)
        self._headers = dict(headers or {})

    def headers(self) -> dict[str, str]:
        return dict(self._headers)


def replayed_error(recorded: dict[str, Any]) -> FlowError:
    """`ReplayedError` with the recorded error's own code and status (a type per pair, since
    both are class attributes of every `FlowError`)."""
    kind = type(
        "ReplayedError",
        (ReplayedError,),
        {"code": str(recorded.get("code", "internal_error")), "status": int(recorded["status"])},
    )
    headers = {str(k): str(v) for k, v in (recorded.get("headers") or {}).items()}
    error: FlowError = kind(
        str(recorded.get("message", "")), field=recorded.get("field"), headers=headers
    )
    return error


class QueueUnavailable(FlowError):
    code = "queue_unavailable"
    status = 503
    retryable = True


class QueueFull(FlowError):
    """The job store is (nearly) out of room: no new job until workers drain some.

    `reason` says which limit closed admission; `retry_after` how long to wait before trying.
    """

    code = "queue_full"
    status = 503
    retryable = True

    def __init__(self, message: str, *, reason: str, retry_after: float) -> None:
        super().__init__(message)
        self.reason = reason
        self.retry_after = retry_after

    def to_dict(self) -> dict[str, Any]:
        return {**super().to_dict(), "reason": self.reason}

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class NoProviderAvailable(FlowError):
    """Every configured provider reports it cannot serve (`/readyz`)."""

    code = "no_provider_available"
    status = 503


# --- access errors (see `auth/`) -------------------------------------------------------------


class Unauthorized(FlowError):
    """No usable API key: missing, malformed, unknown, revoked or expired."""

    code = "unauthorized"
    status = 401

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": 'Bearer realm="flow-api"'}


class Forbidden(FlowError):
    """The key is valid but lacks the scope this endpoint needs."""

    code = "forbidden"
    status = 403


class RateLimited(FlowError):
    """Too many requests for this key's window; try again after `retry_after` seconds."""

    code = "rate_limited"
    status = 429
    retryable = True

    def __init__(self, message: str, *, retry_after: float) -> None:
        super().__init__(message)
        self.retry_after = retry_after

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(max(1, math.ceil(self.retry_after)))}


class QuotaExhausted(RateLimited):
    """The key's token quota for this window cannot cover the request's estimate."""

    code = "quota_exhausted"


# --- job outcomes that are not provider failures ----------------------------------------------


class JobCancelled(FlowError):
    """A client cancelled the job; it is not retried."""

    code = "cancelled"
    status = 409


class JobExpired(FlowError):
    """The job could not start before its deadline (`startWithinMs`); it is not run late."""

    code = "expired"
    status = 409


class WorkerLost(FlowError):
    """The job's workers stopped while running it (a crash, a kill, a lost Redis) more often
    than `FLOW_WORKER_MAX_STALLED` allows: not run again, since each run may cost a provider
    call and the job may be what kills them."""

    code = "worker_lost"


class WorkerFault(FlowError):
    """Something unexpected went wrong in the worker (a bug): retried like a transient error."""

    code = "worker_error"
    retryable = True


# --- provider errors (raised in workers, recorded on the job) -------------------------------


class ProviderError(FlowError):
    """A provider call failed; `retryable` says whether another attempt may succeed."""

    code = "provider_error"
    status = 502

    def __init__(self, message: str, *, retry_after: float | None = None) -> None:
        # Scrubbed here, once for every path: the text often quotes the provider's answer or an
        # SDK exception (a key it refused, a gateway's URL with its password), and it is stored
        # on the job, shown to its submitter and logged.
        from flow_api.redaction import redact_secrets  # a leaf module; keeps this one import-free

        super().__init__(redact_secrets(message))
        self.retry_after = retry_after


class ProviderTimeout(ProviderError):
    code = "provider_timeout"
    retryable = True


class ProviderUnavailable(ProviderError):
    """Connection refused or reset, or a 5xx answer."""

    code = "provider_unavailable"
    retryable = True


class ProviderRateLimited(ProviderError):
    """A 429; `ratelimit` holds the answer's rate-limit headers, which the budget learns from."""

    code = "provider_rate_limited"
    retryable = True

    def __init__(
        self,
        message: str,
        *,
        retry_after: float | None = None,
        ratelimit: dict[str, str] | None = None,
    ) -> None:
        super().__init__(message, retry_after=retry_after)
        self.ratelimit = ratelimit or {}


class ProviderRejected(ProviderError):
    """The provider refused the request as malformed (a 400 or 422)."""

    code = "provider_rejected"


class ProviderAuthFailed(ProviderError):
    code = "provider_auth_failed"


class ContextTooLong(ProviderError):
    code = "context_too_long"


class ContentFiltered(ProviderError):
    code = "content_filtered"


class ProviderMisconfigured(ProviderError):
    """The worker cannot build the provider (missing key, missing model file)."""

    code = "provider_misconfigured"


class LocalModelCrashed(ProviderUnavailable):
    """The local model's process died (a signal, an abort, an OOM kill) while running this
    attempt; the supervisor starts a new one, so another attempt may succeed."""

    code = "local_model_crashed"

    def __init__(self, message: str, *, signal: str | None = None) -> None:
        super().__init__(message)
        self.signal = signal  # "SIGSEGV", "SIGKILL", ... or None for a plain non-zero exit


class LocalModelUnavailable(ProviderUnavailable):
    """The local model's process keeps dying before it can answer (a build that does not run on
    this CPU, a GGUF that crashes llama.cpp): the `local` provider is off until it is fixed.

    503 at submit, not 422: the request is fine; this server cannot run it until its operator
    fixes the build (the message names the command). Queued jobs fail with it after their attempts.
    """

    code = "local_model_unavailable"
    status = 503
