"""OpenTelemetry traces: a span per submit, per attempt and per provider call, in one trace.

Off unless configured, with OpenTelemetry's standard variables: `OTEL_EXPORTER_OTLP_ENDPOINT`
(or `OTEL_EXPORTER_OTLP_TRACES_ENDPOINT`) turns on an OTLP/HTTP exporter with a batching
processor; `OTEL_SERVICE_NAME`, `OTEL_RESOURCE_ATTRIBUTES`, `OTEL_TRACES_SAMPLER` and the
exporter's headers, timeout and compression variables work as documented by OpenTelemetry;
`OTEL_SDK_DISABLED=true` turns it off again. Unconfigured, the API's tracer is OpenTelemetry's
no-op one: spans cost a few attribute look-ups and nothing is stored or sent.

The submit span's W3C trace context (`traceparent`, `tracestate`) travels in the job's data
(`JobData.trace`), so each attempt's span, on whichever worker takes it, is a child of the
submit span: retries of a job and its provider calls all share the submit's trace id.
"""

from __future__ import annotations

import os
from collections.abc import Mapping
from typing import TYPE_CHECKING

from opentelemetry import trace
from opentelemetry.context import Context
from opentelemetry.propagate import extract, inject

if TYPE_CHECKING:  # the SDK is imported only when traces are on (it adds to every start-up)
    from opentelemetry.sdk.trace import SpanProcessor, TracerProvider

TRACER_NAME = "flow_api"
ENDPOINT_VARIABLES = ("OTEL_EXPORTER_OTLP_ENDPOINT", "OTEL_EXPORTER_OTLP_TRACES_ENDPOINT")


def configured(environ: Mapping[str, str] | None = None) -> bool:
    """True when the environment asks for traces to be exported."""
    env = os.environ if environ is None else environ
    if env.get("OTEL_SDK_DISABLED", "").lower() == "true":
        return False
    return any(env.get(name) for name in ENDPOINT_VARIABLES)


_installed: list[trace.Tracer] = []
"""The tracer of the provider `install` was given, if any."""


def install(provider: trace.TracerProvider | None) -> None:
    """Send this process's spans to `provider` (None: back to OpenTelemetry's global one,
    a no-op unless something installed another). Tests install theirs and take it back."""
    _installed.clear()
    if provider is not None:
        _installed.append(provider.get_tracer(TRACER_NAME))


def configure_tracing(role: str, processor: SpanProcessor | None = None) -> TracerProvider | None:
    """Install a tracer provider for this process (`role`: api, worker or up) when the
    environment asks for one, or when a caller hands its own `processor`; returns it (to shut
    down on exit), or None when traces stay off. It also becomes OpenTelemetry's global
    provider, so that libraries instrumented for OpenTelemetry join the same traces."""
    if processor is None and not configured():
        return None
    from opentelemetry.sdk.resources import Resource
    from opentelemetry.sdk.trace import TracerProvider

    if processor is None:
        from opentelemetry.exporter.otlp.proto.http.trace_exporter import OTLPSpanExporter
        from opentelemetry.sdk.trace.export import BatchSpanProcessor

        processor = BatchSpanProcessor(OTLPSpanExporter())
    resource = Resource.create({"service.name": "flow-api", "flow.role": role})
    if os.environ.get("OTEL_SERVICE_NAME"):
        resource = Resource.create({"flow.role": role})  # the variable names the service
    provider = TracerProvider(resource=resource)
    provider.add_span_processor(processor)
    trace.set_tracer_provider(provider)
    install(provider)
    return provider


def tracer() -> trace.Tracer:
    """The tracer every span of ours starts from."""
    return _installed[0] if _installed else trace.get_tracer(TRACER_NAME)


def carrier_of_current() -> dict[str, str] | None:
    """The current span's W3C trace context as headers, or None when nothing is traced."""
    if not trace.get_current_span().get_span_context().is_valid:
        return None
    carrier: dict[str, str] = {}
    inject(carrier)
    return carrier or None


def context_of(carrier: Mapping[str, str] | None) -> Context | None:
    """The parent context a job carries, or None."""
    return extract(dict(carrier)) if carrier else None


def trace_id_of(carrier: Mapping[str, str] | None) -> str | None:
    """The 32-hex-digit trace id in a `traceparent`, or None."""
    parent = (carrier or {}).get("traceparent", "")
    parts = parent.split("-")
    return parts[1] if len(parts) == 4 and len(parts[1]) == 32 else None


def current_trace_id() -> str | None:
    """The trace id of the current span, or None outside a recorded trace."""
    context = trace.get_current_span().get_span_context()
    return format(context.trace_id, "032x") if context.is_valid else None
