"""Wire schemas, one per direction. camelCase on the wire, snake_case in Python."""

from __future__ import annotations

from datetime import datetime
from enum import StrEnum
from typing import Annotated, Any

from pydantic import BaseModel, ConfigDict, Field, StrictFloat, StrictInt, StrictStr
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


class GenerateOptions(WireModel):
    """Per-request generation options; every field is optional."""

    temperature: Annotated[StrictFloat | StrictInt, Field(ge=0, le=2)] | None = None
    max_tokens: Annotated[StrictInt, Field(ge=1, le=1_000_000)] | None = None
    provider: Annotated[StrictStr, Field(min_length=1, max_length=64)] | None = None
    model: Annotated[StrictStr, Field(min_length=1, max_length=256)] | None = None
    system: Annotated[StrictStr, Field(max_length=100_000)] | None = None
    timeout_ms: Annotated[StrictInt, Field(ge=100, le=3_600_000)] | None = None
    priority: Annotated[StrictInt, Field(ge=1, le=2_097_152)] | None = None
    stop: Annotated[list[StrictStr], Field(max_length=8)] | None = None
    seed: StrictInt | None = None
    start_within_ms: Annotated[StrictInt, Field(ge=1, le=30 * 86_400_000)] | None = None
    metadata: dict[str, Any] | None = None


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


class Usage(WireModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0
    total_tokens: int = 0


class Generation(WireModel):
    """What one successful provider call produced; stored as the BullMQ return value."""

    text: str
    provider: str
    model: str
    usage: Usage
    finish_reason: str | None = None


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
