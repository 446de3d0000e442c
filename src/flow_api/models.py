"""Wire schemas, one per direction. camelCase on the wire, snake_case in Python."""

from __future__ import annotations

from datetime import date, datetime
from enum import StrEnum
from typing import Annotated, Any

import orjson
from pydantic import (
    BaseModel,
    ConfigDict,
    Field,
    StrictFloat,
    StrictInt,
    StrictStr,
    field_validator,
)
from pydantic.alias_generators import to_camel


class WireModel(BaseModel):
    """Base for every wire schema: camelCase aliases, unknown fields rejected."""

    model_config = ConfigDict(
        alias_generator=to_camel, populate_by_name=True, extra="forbid", frozen=True
    )

    def wire(self) -> dict[str, Any]:
        """The JSON-ready dict with camelCase keys and no unset optional fields."""
        return self.model_dump(by_alias=True, exclude_none=True, mode="json")


# --- requests -------------------------------------------------------------------------------


StopSequence = Annotated[StrictStr, Field(min_length=1, max_length=200)]


class WebhookEventType(StrEnum):
    """The job endings a webhook can be sent for (as `job.<type>` events)."""

    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"


MAX_WEBHOOK_URL_BYTES = 2048


class WebhookOptions(WireModel):
    """`options.webhook`: where to POST, signed, when the job ends (and for which endings)."""

    url: Annotated[StrictStr, Field(min_length=1, max_length=MAX_WEBHOOK_URL_BYTES)]
    events: Annotated[list[WebhookEventType], Field(min_length=1, max_length=4)] = Field(
        default_factory=lambda: list(WebhookEventType)
    )


class GenerateOptions(WireModel):
    """Per-request generation options; every field is optional."""

    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
    provider: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    system: Annotated[StrictStr, Field(max_length=100_000)] | None = None
    timeout_ms: Annotated[StrictInt, Field(ge=100, le=86_400_000)] | None = None
    priority: Annotated[StrictInt, Field(ge=1, le=2_097_152)] | None = None
    stop: Annotated[list[StopSequence], Field(max_length=8)] | None = None
    seed: Annotated[StrictInt, Field(ge=-(2**63), le=2**63 - 1)] | None = None
    start_within_ms: Annotated[StrictInt, Field(ge=1, le=30 * 86_400_000)] | None = None
    metadata: dict[str, Any] | None = None
    webhook: WebhookOptions | None = None

    @field_validator("metadata")
    @classmethod
    def _plain_json(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        # Metadata is stored and echoed back as is: refuse what JSON cannot carry faithfully
        # (NaN/Infinity, integers past 64 bits, lone surrogates, nesting deeper than 255).
        if value is None:
            return None
        try:
            same = orjson.loads(orjson.dumps(value)) == value
        except orjson.JSONEncodeError:
            same = False
        if not same:
            raise ValueError(
                "must be plain JSON: finite numbers, 64-bit integers, valid Unicode, "
                "nesting up to 255 levels"
            )
        return value


class GenerateRequest(WireModel):
    """`POST /api/ai/generate` body."""

    prompt: Annotated[StrictStr, Field(min_length=1)]
    options: GenerateOptions = Field(default_factory=GenerateOptions)


# --- answers --------------------------------------------------------------------------------


class JobStatus(StrEnum):
    WAITING = "waiting"
    ACTIVE = "active"
    COMPLETED = "completed"
    FAILED = "failed"
    CANCELLED = "cancelled"
    EXPIRED = "expired"

    @property
    def finished(self) -> bool:
        return self not in (JobStatus.WAITING, JobStatus.ACTIVE)


class ErrorInfo(WireModel):
    """Why an attempt or a job failed."""

    code: str
    message: str
    retryable: bool = False
    attempts: int | None = None


class ErrorDetail(WireModel):
    code: str
    message: str
    field: str | None = None


class ErrorPayload(WireModel):
    model_config = ConfigDict(extra="allow")

    code: str = Field(description="stable, machine-readable")
    message: str = Field(description="for a person")
    field: str | None = None
    details: list[ErrorDetail] | None = None
    cause: ErrorInfo | None = None


class ErrorBody(WireModel):
    """Every 4xx and 5xx answer."""

    error: ErrorPayload


class JobAccepted(WireModel):
    job_id: str
    status: JobStatus = JobStatus.WAITING


class JobView(WireModel):
    """`GET /api/ai/status/{jobId}`."""

    job_id: str
    status: JobStatus
    attempts: int
    created_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    error: ErrorInfo | None = None
    metadata: dict[str, Any] | None = None


class CancelledJob(WireModel):
    """A cancel's answer to a key without the `read` scope: that the cancel won, nothing of the
    job's status or metadata (which only `read` may see)."""

    job_id: str
    status: JobStatus


class Usage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Cost(WireModel):
    """What a job's tokens cost at the deployment's price table (`FLOW_USAGE_PRICES`)."""

    amount: float
    currency: str


class Generation(WireModel):
    """What one successful provider call produced; stored as the BullMQ return value."""

    text: str
    provider: str
    model: str
    usage: Usage
    finish_reason: str | None = None
    cost: Cost | None = None


class JobResult(WireModel):
    """`GET /api/ai/result/{jobId}` once completed."""

    job_id: str
    status: JobStatus
    result: Generation
    metadata: dict[str, Any] | None = None


class Attempt(WireModel):
    """One try at running a job."""

    attempt: int
    started_at: datetime
    finished_at: datetime | None = None
    provider: str
    model: str
    worker: str | None = None
    error: ErrorInfo | None = None


class LogLine(WireModel):
    at: datetime
    message: str


class Timings(WireModel):
    queued_at: datetime
    started_at: datetime | None = None
    finished_at: datetime | None = None
    queue_ms: int | None = None
    run_ms: int | None = None


class WebhookAttempt(WireModel):
    """One try at delivering a job's webhook event (never the receiver's answer body)."""

    event_id: str
    type: WebhookEventType
    attempt: int
    at: datetime
    status_code: int | None = None
    error: str | None = None
    duration_ms: int | None = None
    delivered: bool = False


class JobRecord(WireModel):
    """`GET /api/ai/jobs/{jobId}`: the whole history of one job."""

    job_id: str
    status: JobStatus
    request: GenerateRequest
    result: Generation | None = None
    error: ErrorInfo | None = None
    attempts: list[Attempt]
    logs: list[LogLine]
    timings: Timings
    trace_id: str | None = None
    """The OpenTelemetry trace of the submit and every attempt (when traces are on)."""
    webhooks: list[WebhookAttempt] | None = None


# --- usage (GET /api/ai/usage) --------------------------------------------------------------


class UsageGroup(WireModel):
    """One model's (or key's) totals over the report's days."""

    name: str
    """`provider/model`, a key id (`-` for jobs submitted without a key), or `total`."""
    jobs: int
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    cost: float


class UsageReport(WireModel):
    """`GET /api/ai/usage`: a tenant's completed jobs' tokens and cost, by model or key."""

    tenant: str
    first: date = Field(alias="from")
    last: date = Field(alias="to")
    group_by: str
    currency: str
    groups: list[UsageGroup]
    total: UsageGroup


# --- job listing (issue 15: GET /api/ai/jobs, GET /api/ai/queue) ----------------------------


class JobList(WireModel):
    """`GET /api/ai/jobs`: a page of the tenant's jobs, newest first."""

    jobs: list[JobView]
    next_cursor: str | None = Field(
        None, description="pass as `cursor` for the next page; absent on the last page"
    )


class QueueCounts(WireModel):
    """`GET /api/ai/queue`: the tenant's jobs by status, overall and per provider."""

    states: dict[str, int]
    providers: dict[str, dict[str, int]]
    counted: int = Field(description="jobs counted (the newest, up to FLOW_STREAM_COUNT_LIMIT)")
    complete: bool = Field(description="false when the tenant has more jobs than were counted")
