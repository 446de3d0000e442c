"""Fixtures for metrics, traces and logs: providers on the simulator, and spans kept in memory
for the tests that read them."""

from __future__ import annotations

from collections.abc import Iterator

import pytest
from opentelemetry.sdk.trace import TracerProvider
from opentelemetry.sdk.trace.export import SimpleSpanProcessor
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flow_api.embedded import EmbeddedValkey
from flow_api.observability import tracing
from flow_api.settings import Settings
from flow_api.testing import Simulator
from tests.support import cloud_settings


@pytest.fixture
def settings(valkey: EmbeddedValkey, simulator: Simulator) -> Settings:
    return cloud_settings(valkey.url, simulator.url)


@pytest.fixture
def spans() -> Iterator[InMemorySpanExporter]:
    """Every span this process (the API and in-process workers) ends during the test."""
    exporter = InMemorySpanExporter()
    provider = TracerProvider()
    provider.add_span_processor(SimpleSpanProcessor(exporter))
    tracing.install(provider)
    try:
        yield exporter
    finally:
        tracing.install(None)
        provider.shutdown()
