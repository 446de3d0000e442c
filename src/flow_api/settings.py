"""One typed settings object, read from `FLOW_*` (and the providers' standard) variables.

Build it once at the entry point (`Settings()`) and pass it down; tests build their own:
`Settings(redis=RedisSettings(url=url))`. Each section reads its own prefix, so the variables
stay flat (`FLOW_REDIS_URL`, `FLOW_WORKER_CONCURRENCY`) while the object is nested.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Literal
from urllib.parse import urlsplit

import orjson
from pydantic import (
    AliasChoices,
    BaseModel,
    ConfigDict,
    Field,
    SecretStr,
    field_validator,
    model_validator,
)
from pydantic_settings import BaseSettings, NoDecode, SettingsConfigDict

ProviderName = Literal["openai", "azure", "anthropic", "local", "fake"]
REDIS_SCHEMES = ("redis", "rediss", "unix")
LOG_LEVELS = ("DEBUG", "INFO", "WARNING", "ERROR", "CRITICAL")


def _section(prefix: str) -> SettingsConfigDict:
    return SettingsConfigDict(
        env_prefix=prefix, extra="ignore", populate_by_name=True, env_ignore_empty=True
    )


class RedisSettings(BaseSettings):
    """Where the queue lives. `redis://`, `rediss://` (TLS) and passwords in the URL all work."""

    model_config = _section("FLOW_REDIS_")

    url: str = "redis://127.0.0.1:6379/0"
    queue_name: str = Field("flow-ai", description="BullMQ queue name shared by API and workers")
    prefix: str = Field("bull", description="BullMQ key prefix; use '{bull}' on Redis Cluster")
    socket_timeout_s: float = Field(5.0, gt=0, description="Redis command timeout")
    appendfsync: Literal["everysec", "always"] = Field(
        "everysec", description="embedded Valkey (`up`): fsync each second, or each write"
    )

    @field_validator("url")
    @classmethod
    def _redis_url(cls, url: str) -> str:
        parts = urlsplit(url)
        if parts.scheme not in REDIS_SCHEMES or not (parts.hostname or parts.path):
            raise ValueError(
                "must be a Redis URL like redis://host:6379/0, rediss://user:password@host:6380/0 "
                "(TLS) or unix:///path/to/socket"
            )
        return url


class ApiSettings(BaseSettings):
    """The HTTP front end."""

    model_config = _section("FLOW_API_")

    host: str = "127.0.0.1"
    port: int = Field(3000, ge=0, le=65535)
    max_body_bytes: int = Field(1_048_576, gt=0, description="larger bodies get 413")
    body_timeout_s: float = Field(
        10.0, gt=0, le=300, description="a body not fully received in this time gets 408"
    )
    max_prompt_chars: int = Field(100_000, gt=0, description="longer prompts get 422")
    max_metadata_bytes: int = Field(4096, gt=0, description="size cap on options.metadata")
    idempotency_ttl_s: int = Field(86_400, ge=1, description="how long an Idempotency-Key holds")
    allowed_hosts: list[str] = Field(
        default_factory=list,
        description='Host names the API answers besides loopback ones, e.g. ["flow.internal", '
        '"*.example.com"]; checked when set, and always with authentication off on loopback',
    )


class WorkerSettings(BaseSettings):
    """How jobs run."""

    model_config = _section("FLOW_WORKER_")

    concurrency: int = Field(100, ge=1, le=10_000, description="jobs in flight per process")
    job_timeout_s: float = Field(120.0, gt=0, description="per-attempt limit unless timeoutMs")
    max_job_timeout_s: float = Field(
        3600.0,
        gt=0,
        le=86_400,
        description="the largest timeoutMs a request may ask for (larger: 422 at submit)",
    )
    attempts: int = Field(5, ge=1, le=50, description="tries per job, the first included")
    backoff_base_ms: int = Field(1000, ge=0, description="first retry delay before jitter")
    backoff_max_ms: int = Field(60_000, ge=0, description="cap on one retry delay")
    retention_s: int = Field(7 * 86_400, ge=60, description="how long finished jobs are kept")
    lock_duration_ms: int = Field(30_000, ge=1000, description="BullMQ lock; renewed at half")
    stalled_interval_ms: int = Field(30_000, ge=1000, description="stalled-job check period")
    max_stalled: int = Field(3, ge=1, description="crash recoveries before a job fails")
    shutdown_grace_s: float = Field(30.0, ge=0, description="in-flight jobs get this long")
    keep_prompt_chars: int = Field(
        1024, ge=0, description="a completed job keeps this much of its prompt in Redis; 0 = all"
    )
    fair_share: bool = Field(
        True, description="take tenants' jobs in weighted round-robin (false: one FIFO line)"
    )
    tenant_weights: dict[str, Annotated[float, Field(gt=0, le=1000)]] = Field(
        default_factory=dict,
        description='share of the workers per tenant, e.g. {"batch": 0.25}; others 1',
    )


class OpenAISettings(BaseSettings):
    """OpenAI or any OpenAI-compatible endpoint (vLLM, Ollama, LiteLLM)."""

    model_config = _section("FLOW_OPENAI_")

    api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("FLOW_OPENAI_API_KEY", "OPENAI_API_KEY", "api_key")
    )
    base_url: str | None = Field(
        None, validation_alias=AliasChoices("FLOW_OPENAI_BASE_URL", "OPENAI_BASE_URL", "base_url")
    )
    model: str = "gpt-4o-mini"
    models: list[str] = Field(default_factory=list, description="allowed models; empty = any")


class AzureSettings(BaseSettings):
    """Azure OpenAI, configured with its standard variables."""

    model_config = _section("FLOW_AZURE_")

    api_key: SecretStr | None = Field(
        None, validation_alias=AliasChoices("FLOW_AZURE_API_KEY", "AZURE_OPENAI_API_KEY", "api_key")
    )
    endpoint: str | None = Field(
        None,
        validation_alias=AliasChoices("FLOW_AZURE_ENDPOINT", "AZURE_OPENAI_ENDPOINT", "endpoint"),
    )
    api_version: str = Field(
        "2024-10-21",
        validation_alias=AliasChoices(
            "FLOW_AZURE_API_VERSION", "OPENAI_API_VERSION", "api_version"
        ),
    )
    deployment: str | None = Field(None, description="default deployment (the model name)")
    models: list[str] = Field(default_factory=list, description="allowed deployments; empty = any")


class AnthropicSettings(BaseSettings):
    """Anthropic's Messages API."""

    model_config = _section("FLOW_ANTHROPIC_")

    api_key: SecretStr | None = Field(
        None,
        validation_alias=AliasChoices("FLOW_ANTHROPIC_API_KEY", "ANTHROPIC_API_KEY", "api_key"),
    )
    base_url: str | None = Field(
        None,
        validation_alias=AliasChoices("FLOW_ANTHROPIC_BASE_URL", "ANTHROPIC_BASE_URL", "base_url"),
    )
    model: str = "claude-3-5-haiku-latest"
    models: list[str] = Field(default_factory=list, description="allowed models; empty = any")
    default_max_tokens: int = Field(1024, ge=1, description="Anthropic requires max_tokens")


class LocalSettings(BaseSettings):
    """The offline provider: llama.cpp running a GGUF file (the `local` extra)."""

    model_config = _section("FLOW_LOCAL_")

    enabled: bool | None = Field(None, description="None = on when the extra is installed")
    model_path: Path | None = Field(None, description="any GGUF; default: the bundled Gemma 3")
    cache_dir: Path | None = Field(None, description="where the bundled GGUF is assembled")
    instances: int = Field(1, ge=1, le=16, description="model copies; jobs queue on them")
    context_size: int = Field(2048, ge=256)
    threads: int | None = Field(
        None, ge=1, description="llama.cpp threads; None = half the cores, shared by instances"
    )
    default_max_tokens: int = Field(256, ge=1)


class ProviderSettings(BaseSettings):
    """Which providers are on, and which answers when a request names none."""

    model_config = _section("FLOW_PROVIDER_")

    default: ProviderName | None = Field(None, description="None = first configured")
    fake_enabled: bool = Field(False, description="deterministic fake model, for dev and tests")


class AuthSettings(BaseSettings):
    """Who may call the API: API keys, each key's default limits, browser origins.

    Off by default, which is only allowed on loopback: binding any other address needs
    `enabled` (keys required) or `allow_unauthenticated` (an explicit opt-out).
    """

    model_config = _section("FLOW_AUTH_")

    enabled: bool = Field(False, description="require `Authorization: Bearer <key>`")
    allow_unauthenticated: bool = Field(
        False, description="serve beyond loopback without keys (behind a trusted gateway only)"
    )
    requests_per_minute: int = Field(600, ge=0, description="submits per key; 0 = unlimited")
    rate_window_s: int = Field(60, ge=1, description="the window requests_per_minute counts over")
    tokens_per_day: int = Field(1_000_000, ge=0, description="tokens per key; 0 = unlimited")
    spend_per_day: float = Field(
        0, ge=0, description="spend per key and quota window, in FLOW_USAGE_CURRENCY; 0 = no cap"
    )
    quota_window_s: int = Field(86_400, ge=1, description="the quota window; UTC days by default")
    estimate_completion_tokens: int = Field(
        1024, ge=1, description="completion tokens reserved at submit when maxTokens is unset"
    )
    cors_origins: list[str] = Field(default_factory=list, description="browser origins; none")


class BudgetLimit(BaseModel):
    """A provider's per-minute limits for one model (or every model, under `provider/*`)."""

    model_config = ConfigDict(extra="forbid")

    rpm: int | None = Field(None, ge=1, description="requests per minute")
    tpm: int | None = Field(None, ge=1, description="tokens per minute")
    itpm: int | None = Field(None, ge=1, description="input tokens per minute (Anthropic)")
    otpm: int | None = Field(None, ge=1, description="output tokens per minute (Anthropic)")


class BudgetSettings(BaseSettings):
    """Provider rate limits shared by every worker through Redis (see `budget/`)."""

    model_config = _section("FLOW_BUDGET_")

    enabled: bool = Field(True, description="hold calls to the limits below and learned ones")
    limits: dict[str, BudgetLimit] = Field(
        default_factory=dict,
        description='JSON: {"openai/gpt-4o-mini": {"rpm": 500, "tpm": 200000}, "openai/*": ...}',
    )
    learn_from_headers: bool = Field(
        True, description="learn limits from the provider's rate-limit headers where none is set"
    )
    headroom: float = Field(0.02, ge=0, le=0.5, description="share of each limit left unused")
    completion_tokens: int = Field(
        256,
        ge=1,
        description="completion tokens reserved without maxTokens until the model's answers say",
    )
    cooldown_s: float = Field(1.0, gt=0, description="pause after a 429 that names no wait")
    inline_wait_ms: int = Field(
        50, ge=0, description="shorter waits are slept in the slot instead of re-queueing"
    )
    horizon_ms: int = Field(
        3000, ge=100, description="how far ahead a waiting job may hold a reserved start"
    )
    max_deferrals: int = Field(
        100,
        ge=1,
        description="put-backs (429s and budget waits) before waiting costs an attempt",
    )


class AdmissionSettings(BaseSettings):
    """When the API stops taking jobs so that Redis keeps room to drain them (see
    `queue/admission.py` and the README's "Running at scale")."""

    model_config = _section("FLOW_ADMISSION_")

    watermark: float = Field(
        0.85, gt=0, le=1, description="share of Redis memory past which submits get 503"
    )
    memory_budget_bytes: int = Field(
        0, ge=0, description="the memory limit when Redis has no maxmemory; 0 = no memory check"
    )
    drain_bytes_per_job: int = Field(
        4096, ge=0, description="memory kept free for each unfinished job to finish in"
    )
    max_unfinished_jobs: int = Field(
        0, ge=0, description="submits get 503 past this many unfinished jobs; 0 = no limit"
    )
    refresh_s: float = Field(
        0.5, gt=0, le=60, description="how long an API process reuses one memory reading"
    )
    retry_after_s: int = Field(5, ge=1, description="Retry-After of a queue_full answer")


# --- Observability (issue 17): metrics, traces, logs, usage and cost --------------------------


class MetricsSettings(BaseSettings):
    """Prometheus metrics: `GET /metrics` on the API, and a port of its own on each worker."""

    model_config = _section("FLOW_METRICS_")

    enabled: bool = Field(True, description="serve GET /metrics on the API")
    worker_port: int | None = Field(
        None,
        ge=0,
        le=65535,
        description="each worker process serves /metrics on this port; unset = no listener "
        "(several workers on one host need one port each)",
    )
    worker_host: str = Field("127.0.0.1", description="address of the worker's metrics port")
    tenants: list[str] = Field(
        default_factory=list,
        description="tenants that get their own `tenant` label; every other tenant is `other`",
    )


class Price(BaseModel):
    """What a model costs, in `FLOW_USAGE_CURRENCY` per million tokens."""

    model_config = ConfigDict(extra="forbid")

    input: float = Field(ge=0, description="per million prompt tokens")
    output: float = Field(ge=0, description="per million completion tokens")


DEFAULT_PRICES: dict[str, Price] = {
    # List prices per million tokens (USD) of common models; override or extend with
    # FLOW_USAGE_PRICES. A model with no entry here (and no `provider/*` one) costs 0.
    "openai/gpt-4o-mini": Price(input=0.15, output=0.60),
    "openai/gpt-4o": Price(input=2.50, output=10.00),
    "openai/gpt-4.1": Price(input=2.00, output=8.00),
    "openai/gpt-4.1-mini": Price(input=0.40, output=1.60),
    "openai/gpt-4.1-nano": Price(input=0.10, output=0.40),
    "openai/o3-mini": Price(input=1.10, output=4.40),
    "azure/gpt-4o-mini": Price(input=0.15, output=0.60),
    "azure/gpt-4o": Price(input=2.50, output=10.00),
    "anthropic/claude-3-5-haiku-latest": Price(input=0.80, output=4.00),
    "anthropic/claude-3-5-sonnet-latest": Price(input=3.00, output=15.00),
    "anthropic/claude-sonnet-4-0": Price(input=3.00, output=15.00),
    "anthropic/claude-opus-4-0": Price(input=15.00, output=75.00),
    "local/*": Price(input=0, output=0),
    "fake/*": Price(input=0, output=0),
}


class UsageSettings(BaseSettings):
    """Token usage and cost per tenant, model and key (`GET /api/ai/usage`)."""

    model_config = _section("FLOW_USAGE_")

    currency: str = Field("USD", min_length=1, max_length=8, description="the prices' currency")
    prices: dict[str, Price] = Field(
        default_factory=dict,
        description='JSON: {"openai/gpt-4o-mini": {"input": 0.15, "output": 0.6}, '
        '"openai/*": ...} per million tokens, over the built-in table',
    )
    retention_days: int = Field(400, ge=1, le=3660, description="days of usage kept in Redis")

    def price_table(self) -> dict[str, Price]:
        """The built-in prices with this deployment's own on top."""
        return {**DEFAULT_PRICES, **self.prices}


# --- batch (issue 16): /v1/files, /v1/batches ----------------------------------------------


class BatchSettings(BaseSettings):
    """OpenAI-compatible batches (`batch/`, the README's "Batches")."""

    model_config = _section("FLOW_BATCH_")

    max_file_bytes: int = Field(
        200_000_000, gt=0, description="larger uploads to /v1/files get 413"
    )
    max_lines: int = Field(50_000, ge=1, description="a batch file with more lines gets 400")
    chunk_bytes: int = Field(
        262_144, ge=1024, description="a file is stored in Redis in pieces of this size"
    )
    enqueue_chunk: int = Field(
        500, ge=1, le=10_000, description="lines validated and queued per round of the driver"
    )
    lease_s: float = Field(
        30.0, gt=0, description="an API process that stops driving a batch loses it after this"
    )
    sweep_s: float = Field(
        1.0, gt=0, description="how often each API process looks for batch work to take over"
    )
    reconcile_s: float = Field(
        60.0,
        gt=0,
        description="how often a running batch's lines are recounted from their jobs' states",
    )
    api_url: str | None = Field(
        None, description="`flow-api batch`: the API to use (default http://localhost:PORT)"
    )
    api_key: SecretStr | None = Field(None, description="`flow-api batch`: the API key to send")


# --- token streaming and job listing (issue 15: GET /api/ai/stream/{jobId}, /api/ai/jobs) ---


class StreamSettings(BaseSettings):
    """Every job's events (status changes, tokens) in a per-job Redis Stream, and the listing."""

    model_config = _section("FLOW_STREAM_")

    enabled: bool = Field(
        True, description="workers write each job's events (off: streams show only the end)"
    )
    tokens: Literal["watched", "always", "never"] = Field(
        "watched",
        description="stream a call's tokens from the provider: when a client watches the job "
        "as its attempt starts (else its text comes as one event at the end), always, or never",
    )
    flush_ms: int = Field(
        20, ge=1, le=1000, description="worker: the longest a token waits before it is written"
    )
    max_events: int = Field(
        2000,
        ge=10,
        description="token events one attempt may write; beyond, the rest comes as one event "
        "when the attempt ends",
    )
    block_ms: int = Field(
        2000, ge=100, le=60_000, description="API: how long one stream read waits in Redis"
    )
    ping_s: float = Field(15.0, gt=0, description="API: keep-alive comment interval")
    count_limit: int = Field(
        10_000, ge=100, description="GET /api/ai/queue: the newest jobs counted per tenant"
    )


# --- webhooks (issue 15 item 2) -------------------------------------------------------------

SVIX_SCHEDULE_S = (5.0, 300.0, 1800.0, 7200.0, 18000.0, 36000.0, 36000.0)
"""Delays before each retry of a webhook delivery: 5 s, 5 min, 30 min, 2 h, 5 h, 10 h, 10 h
(Svix's schedule; about 27 h from the first attempt to the last)."""


class WebhookSettings(BaseSettings):
    """Signed webhook deliveries when jobs end (see `webhooks/` and the README's "Webhooks")."""

    model_config = _section("FLOW_WEBHOOK_")

    allow_hosts: Annotated[list[str], NoDecode] = Field(
        default_factory=list,
        description="host names or CIDRs that may be private/loopback and plain http "
        "(comma-separated or JSON); empty = public https only",
    )
    schedule_s: Annotated[list[Annotated[float, Field(ge=0)]], Field(max_length=50)] = Field(
        default_factory=lambda: list(SVIX_SCHEDULE_S),
        description="delay before each retry; its length is the number of retries",
    )
    jitter: float = Field(0.2, ge=0, le=1, description="each delay varies by up to this share")
    timeout_s: float = Field(10.0, gt=0, le=60, description="one delivery's connect+answer limit")
    concurrency: int = Field(50, ge=1, le=1000, description="deliveries in flight per worker")
    secret_grace_s: int = Field(
        86_400, ge=0, description="after a rotate, the old secret also signs this long"
    )
    sweep_interval_s: float = Field(
        1.0, gt=0, le=60, description="how often a worker looks for jobs that ended"
    )
    default_cache_s: float = Field(
        5.0, ge=0, le=300, description="how long an API process reuses a tenant's default"
    )

    @field_validator("allow_hosts", mode="before")
    @classmethod
    def _comma_separated(cls, value: object) -> object:
        if isinstance(value, str):
            text = value.strip()
            if text.startswith("["):
                return orjson.loads(text)
            return [part.strip() for part in text.split(",") if part.strip()]
        return value


class Settings(BaseSettings):
    """Every setting of the service, grouped by concern."""

    model_config = SettingsConfigDict(env_prefix="FLOW_", extra="ignore")

    redis: RedisSettings = Field(default_factory=RedisSettings)
    api: ApiSettings = Field(default_factory=ApiSettings)
    worker: WorkerSettings = Field(default_factory=WorkerSettings)
    provider: ProviderSettings = Field(default_factory=ProviderSettings)
    openai: OpenAISettings = Field(default_factory=OpenAISettings)
    azure: AzureSettings = Field(default_factory=AzureSettings)
    anthropic: AnthropicSettings = Field(default_factory=AnthropicSettings)
    local: LocalSettings = Field(default_factory=LocalSettings)
    auth: AuthSettings = Field(default_factory=AuthSettings)
    budget: BudgetSettings = Field(default_factory=BudgetSettings)
    admission: AdmissionSettings = Field(default_factory=AdmissionSettings)
    metrics: MetricsSettings = Field(default_factory=MetricsSettings)
    usage: UsageSettings = Field(default_factory=UsageSettings)
    log_format: Literal["text", "json"] = Field("text", description="FLOW_LOG_FORMAT")
    batch: BatchSettings = Field(default_factory=BatchSettings)
    stream: StreamSettings = Field(default_factory=StreamSettings)
    webhook: WebhookSettings = Field(default_factory=WebhookSettings)
    log_level: str = Field("INFO", description="FLOW_LOG_LEVEL")

    @field_validator("log_level")
    @classmethod
    def _log_level(cls, level: str) -> str:
        if level.upper() not in LOG_LEVELS:
            raise ValueError(f"must be one of {', '.join(LOG_LEVELS)}")
        return level.upper()

    @model_validator(mode="after")
    def _check(self) -> Settings:
        if self.worker.backoff_max_ms < self.worker.backoff_base_ms:
            raise ValueError("FLOW_WORKER_BACKOFF_MAX_MS must be >= FLOW_WORKER_BACKOFF_BASE_MS")
        return self


SECTIONS: dict[str, type[BaseSettings]] = {
    "redis": RedisSettings,
    "api": ApiSettings,
    "worker": WorkerSettings,
    "provider": ProviderSettings,
    "openai": OpenAISettings,
    "azure": AzureSettings,
    "anthropic": AnthropicSettings,
    "local": LocalSettings,
    "auth": AuthSettings,
    "budget": BudgetSettings,
    "admission": AdmissionSettings,
    "metrics": MetricsSettings,
    "usage": UsageSettings,
    "batch": BatchSettings,
    "stream": StreamSettings,
    "webhook": WebhookSettings,
}
