"""Traces: submit → attempt → provider call in one trace, a retry's attempts in the same one,
and the trace id in the job's record and in the worker's JSON log lines."""

from __future__ import annotations

import asyncio

import orjson
from opentelemetry.sdk.trace import ReadableSpan
from opentelemetry.sdk.trace.export.in_memory_span_exporter import InMemorySpanExporter

from flow_api.observability.tracing import configured, trace_id_of
from flow_api.settings import Settings
from flow_api.testing import Simulator
from flow_api.worker import FlowWorker
from tests.support import Api, WorkerFactory
from tests.support.processes import astop, env_for, flow_api, wait_for_workers


def hex_id(value: int, digits: int) -> str:
    return format(value, f"0{digits}x")


async def spans_of(exporter: InMemorySpanExporter, job_id: str, count: int) -> list[ReadableSpan]:
    """The spans of the job's trace once `count` of them have ended (the attempt span ends
    just after the job's status turns final)."""
    for _ in range(1000):  # 20 s: a loaded host can be slow to end a span
        submit = [
            s for s in exporter.get_finished_spans() if s.attributes.get("flow.job_id") == job_id
        ]
        if submit:
            trace_id = submit[0].context.trace_id
            found = [s for s in exporter.get_finished_spans() if s.context.trace_id == trace_id]
            if len(found) >= count:
                return sorted(found, key=lambda s: s.start_time or 0)
        await asyncio.sleep(0.02)
    raise AssertionError(f"spans of {job_id}: {exporter.get_finished_spans()}")


async def test_submit_attempt_and_provider_call_share_one_trace(
    spans: InMemorySpanExporter, api: Api, worker: FlowWorker
) -> None:
    job_id = await api.submit("traced")
    assert (await api.wait(job_id))["status"] == "completed"
    found = await spans_of(spans, job_id, 3)
    by_name = {s.name: s for s in found}
    assert sorted(by_name) == ["flow.attempt", "flow.provider_call", "flow.submit"]
    submit, attempt, call = (
        by_name["flow.submit"],
        by_name["flow.attempt"],
        by_name["flow.provider_call"],
    )
    assert attempt.parent is not None and attempt.parent.span_id == submit.context.span_id
    assert call.parent is not None and call.parent.span_id == attempt.context.span_id
    assert attempt.attributes["flow.job_id"] == job_id
    assert attempt.attributes["flow.outcome"] == "completed"
    assert call.attributes["gen_ai.system"] == "openai"
    assert call.attributes["gen_ai.usage.output_tokens"] > 0
    record = await api.record(job_id)
    assert record["traceId"] == hex_id(submit.context.trace_id, 32)


async def test_a_retried_job_shows_both_attempts_in_its_trace(
    spans: InMemorySpanExporter, api: Api, worker: FlowWorker, simulator: Simulator
) -> None:
    job_id = await api.submit("[[sim:retry-trace:500,ok]] traced twice")
    assert (await api.wait(job_id))["status"] == "completed"
    found = await spans_of(spans, job_id, 5)
    submit = next(s for s in found if s.name == "flow.submit")
    attempts = [s for s in found if s.name == "flow.attempt"]
    calls = [s for s in found if s.name == "flow.provider_call"]
    assert [a.attributes["flow.attempt"] for a in attempts] == [1, 2]
    assert [a.attributes["flow.outcome"] for a in attempts] == ["retry", "completed"]
    assert attempts[0].attributes["flow.error_code"] == "provider_unavailable"
    assert all(
        a.parent is not None and a.parent.span_id == submit.context.span_id for a in attempts
    )
    assert sorted(c.parent.span_id for c in calls if c.parent) == sorted(
        a.context.span_id for a in attempts
    )
    assert simulator.stats.by_key["retry-trace"] == 2


async def test_untraced_jobs_carry_no_trace(api: Api, start_worker: WorkerFactory) -> None:
    await start_worker()
    job_id = await api.submit("not traced")
    assert (await api.wait(job_id))["status"] == "completed"
    assert "traceId" not in await api.record(job_id)


def test_traces_are_off_unless_an_endpoint_is_set() -> None:
    assert not configured({})
    assert configured({"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318"})
    assert configured({"OTEL_EXPORTER_OTLP_TRACES_ENDPOINT": "http://collector:4318/v1/traces"})
    assert not configured(
        {"OTEL_EXPORTER_OTLP_ENDPOINT": "http://collector:4318", "OTEL_SDK_DISABLED": "true"}
    )
    assert trace_id_of({"traceparent": f"00-{'a' * 32}-{'b' * 16}-01"}) == "a" * 32
    assert trace_id_of({"traceparent": "garbage"}) is None


async def test_json_log_lines_carry_the_job_tenant_attempt_and_trace(
    spans: InMemorySpanExporter, api: Api, settings: Settings, simulator: Simulator
) -> None:
    secret_prompt = "the-prompt-text-must-not-be-logged"
    env = env_for(settings, FLOW_LOG_FORMAT="json")
    process = flow_api("worker", env=env)
    try:
        await wait_for_workers(settings, 1, timeout_s=90)
        job_id = await api.submit(f"[[sim:json-logs:500,ok]] {secret_prompt}")
        assert (await api.wait(job_id))["status"] == "completed"
    finally:
        code, output = await astop(process)
    assert code == 0, output
    lines = [orjson.loads(line) for line in output.splitlines() if line.strip()]
    assert all({"time", "level", "logger", "message"} <= set(line) for line in lines)
    about_job = [line for line in lines if line.get("job_id") == job_id]
    assert about_job, lines
    retry_line = next(line for line in about_job if "will retry" in line["message"])
    assert retry_line["tenant"] == "default"
    assert retry_line["attempt"] == 1
    trace_id = (await api.record(job_id))["traceId"]
    assert retry_line["trace_id"] == trace_id
    assert secret_prompt not in output
