"""Admission control's rule, and the trim that lets a completed job free its prompt's memory."""

from __future__ import annotations

from flow_api.jobs import JobData
from flow_api.models import GenerateOptions, GenerateRequest
from flow_api.queue.admission import QueueRoom
from flow_api.settings import AdmissionSettings

MB = 1_048_576


def room(used: int, limit: int, unfinished: int) -> QueueRoom:
    return QueueRoom(
        used_bytes=used, limit_bytes=limit, limit_source="maxmemory", unfinished_jobs=unfinished
    )


def test_admission_closes_when_the_backlog_would_not_fit_its_drain_under_the_watermark() -> None:
    settings = AdmissionSettings(watermark=0.8, drain_bytes_per_job=4096)
    assert room(70 * MB, 100 * MB, 0).refusal(settings) is None
    # 70 MB used and 2560 unfinished jobs x 4 KB = 10 MB reserved: 80 MB, right at the mark.
    assert room(70 * MB, 100 * MB, 2560).refusal(settings) is None
    refusal = room(70 * MB, 100 * MB, 2561).refusal(settings)
    assert refusal is not None
    assert (refusal.code, refusal.status, refusal.reason) == ("queue_full", 503, "redis_memory")
    assert refusal.headers() == {"Retry-After": "5"}
    assert room(81 * MB, 100 * MB, 0).refusal(settings) is not None


def test_without_a_memory_limit_only_the_backlog_cap_applies() -> None:
    assert room(10**12, 0, 10**6).refusal(AdmissionSettings()) is None
    capped = AdmissionSettings(max_unfinished_jobs=100)
    assert room(0, 0, 99).refusal(capped) is None
    refusal = room(0, 0, 100).refusal(capped)
    assert refusal is not None and refusal.reason == "max_unfinished_jobs"


def test_a_trimmed_envelope_keeps_everything_but_the_long_texts() -> None:
    request = GenerateRequest(
        prompt="p" * 5000,
        options=GenerateOptions(system="s" * 3000, max_tokens=7, metadata={"run": 1}),
    )
    data = JobData.submitted(request, provider="fake", model="echo", tenant="acme")
    trimmed = JobData.parse(data.trimmed(1024).wire())
    assert trimmed.request.prompt == "p" * 1024
    assert trimmed.request.options.system == "s" * 1024
    assert trimmed.trimmed_chars == 8000
    assert (trimmed.tenant, trimmed.provider, trimmed.metadata) == ("acme", "fake", {"run": 1})
    assert trimmed.request.options.max_tokens == 7
    short = JobData.submitted(
        GenerateRequest(prompt="short"), provider="fake", model="echo", tenant="acme"
    )
    assert short.trimmed(1024) is short
