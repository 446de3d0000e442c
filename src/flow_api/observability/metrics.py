"""Prometheus metrics: what each process counts, and the label policy that keeps them bounded.

Each process (API or worker) has its own `METRICS` on its own registry and serves it itself:
the API at `GET /metrics`, each worker on `FLOW_METRICS_WORKER_PORT`. Prometheus scrapes every
process (a pod, a container) and sums with `sum by (...)`, the usual way for services that
scale by processes. This is prometheus-client's plain mode, not its multiprocess mode: our
processes are separate containers, not forks of one parent sharing a folder, and live gauges
(worker slots) have no meaningful sum across a folder of dead processes' files.

Labels are bounded (see `LabelPolicy`): `tenant` only for tenants named in
`FLOW_METRICS_TENANTS` (every other tenant is `other`), `model` only for models the deployment
knows (an allow-list, a provider's default, or a priced model; any other name a client sends is
`other`), `provider` from the configured providers. No job id is ever a label.
"""

from __future__ import annotations

from collections.abc import Iterable

from prometheus_client import (
    CollectorRegistry,
    Counter,
    Gauge,
    Histogram,
    PlatformCollector,
    ProcessCollector,
)

from flow_api.jobs import DEFAULT_TENANT
from flow_api.providers import ProviderRegistry
from flow_api.settings import Settings

OTHER = "other"
"""The label value of every tenant or model outside the policy's lists."""

OUTCOMES = ("completed", "failed", "cancelled", "expired")

_JOB = ("provider", "model", "tenant")
_LATENCY_S = (0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300, 900, 3600)


class LabelPolicy:
    """Maps a job's tenant and model to label values from bounded sets."""

    def __init__(self, tenants: Iterable[str] = (), models: Iterable[str] = ()) -> None:
        self.tenants = frozenset([DEFAULT_TENANT, *tenants])
        self.models = frozenset(models)
        """`provider/model` pairs that keep their name."""
        self.any_model_of: frozenset[str] = frozenset()
        """Providers with an allow-list: every model they accept keeps its name."""

    def tenant(self, tenant: str) -> str:
        return tenant if tenant in self.tenants else OTHER

    def model(self, provider: str, model: str) -> str:
        if provider in self.any_model_of or f"{provider}/{model}" in self.models:
            return model
        return OTHER


class Metrics:
    """Every metric of one process, on a registry of its own (not prometheus-client's default
    one, which any imported library may add to)."""

    def __init__(self) -> None:
        self.registry = registry = CollectorRegistry()
        ProcessCollector(registry=registry)
        PlatformCollector(registry=registry)
        self.policy = LabelPolicy()
        self.jobs_submitted = Counter(
            "flow_jobs_submitted", "Jobs accepted (202) by the API", _JOB, registry=registry
        )
        self.jobs_finished = Counter(
            "flow_jobs_finished",
            "Jobs that reached an end state, by outcome (completed, failed, cancelled, expired)",
            (*_JOB, "outcome"),
            registry=registry,
        )
        self.attempts_retried = Counter(
            "flow_attempts_retried",
            "Attempts that failed and will be retried, by error code",
            ("provider", "model", "code"),
            registry=registry,
        )
        self.budget_deferrals = Counter(
            "flow_budget_deferrals",
            "Jobs put back to wait for rate budget (after a 429 too), no attempt spent",
            ("provider", "model"),
            registry=registry,
        )
        self.provider_rate_limited = Counter(
            "flow_provider_rate_limited",
            "Provider calls answered 429",
            ("provider", "model"),
            registry=registry,
        )
        self.queue_seconds = Histogram(
            "flow_job_queue_seconds",
            "From submit to the first attempt's start",
            ("provider", "model"),
            buckets=_LATENCY_S,
            registry=registry,
        )
        self.attempt_seconds = Histogram(
            "flow_attempt_seconds",
            "One attempt, from taken to its outcome",
            ("provider", "model", "outcome"),
            buckets=_LATENCY_S,
            registry=registry,
        )
        self.provider_call_seconds = Histogram(
            "flow_provider_call_seconds",
            "One provider call (the LangChain pipeline), by outcome (ok or an error code)",
            ("provider", "model", "outcome"),
            buckets=_LATENCY_S,
            registry=registry,
        )
        self.tokens = Counter(
            "flow_tokens",
            "Tokens of completed jobs, by direction (prompt, completion)",
            (*_JOB, "direction"),
            registry=registry,
        )
        self.cost = Counter(
            "flow_cost",
            "Cost of completed jobs in FLOW_USAGE_CURRENCY (the price table's units)",
            _JOB,
            registry=registry,
        )
        self.redis_errors = Counter(
            "flow_redis_errors",
            "Redis unreachable or refusing writes, as met by this process",
            ("operation",),
            registry=registry,
        )
        self.slots = Gauge("flow_worker_slots", "Configured job slots", registry=registry)
        self.slots_live = Gauge(
            "flow_worker_slots_live",
            "Job slots running now (the heartbeat's live count)",
            registry=registry,
        )
        self.in_flight = Gauge("flow_worker_jobs_in_flight", "Jobs running now", registry=registry)
        self.queue_jobs = Gauge(
            "flow_queue_jobs",
            "Jobs in each queue state, read from Redis at scrape time (API only)",
            ("state",),
            registry=registry,
        )

    def job_labels(self, provider: str, model: str, tenant: str) -> tuple[str, str, str]:
        """The bounded (provider, model, tenant) label values of a job."""
        return provider, self.policy.model(provider, model), self.policy.tenant(tenant)

    def finished(self, provider: str, model: str, tenant: str, outcome: str) -> None:
        self.jobs_finished.labels(*self.job_labels(provider, model, tenant), outcome).inc()


METRICS = Metrics()
"""This process's metrics. Module-level as Prometheus clients are by design: a counter belongs
to the process that increments it, whichever object does so."""


def configure_labels(settings: Settings, registry: ProviderRegistry) -> None:
    """Set this process's label policy from the settings and the configured providers."""
    policy = LabelPolicy(settings.metrics.tenants, settings.usage.price_table())
    models = set(policy.models)
    restricted = set()
    for provider in registry.providers.values():
        models.add(f"{provider.name}/{provider.default_model}")
        if provider.allowed_models:
            restricted.add(provider.name)
    policy.models = frozenset(models)
    policy.any_model_of = frozenset(restricted)
    METRICS.policy = policy
