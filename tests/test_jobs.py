"""`JobData`: the envelope's wire form and its rules (deadline, token estimate)."""

from __future__ import annotations

import pytest

from flow_api.errors import InvalidRequest
from flow_api.jobs import MESSAGE_OVERHEAD_TOKENS, Charge, JobData, estimate_tokens, quota_bound
from flow_api.models import GenerateOptions, GenerateRequest


def request(prompt: str = "x" * 40, **options: object) -> GenerateRequest:
    return GenerateRequest(prompt=prompt, options=GenerateOptions.model_validate(options))


def test_the_wire_form_is_what_jobs_were_always_stored_with() -> None:
    charge = Charge(key_id="k1", window=7, tokens=50)
    data = JobData.submitted(
        request(startWithinMs=500), provider="openai", model="m", tenant="acme", now=1_000
    ).with_charge(charge)
    assert data.wire() == {
        "request": {"prompt": "x" * 40, "options": {"startWithinMs": 500}},
        "provider": "openai",
        "model": "m",
        "tenant": "acme",
        "startBy": 1_500,
        "tokenCharge": {"key_id": "k1", "window": 7, "tokens": 50},
    }
    assert JobData.parse(data.wire()) == data


def test_jobs_stored_before_tenants_existed_belong_to_the_default_tenant() -> None:
    data = JobData.parse({"request": {"prompt": "hi"}, "provider": "fake"})
    assert (data.tenant, data.model, data.start_by_ms, data.charge) == ("default", None, None, None)


def test_data_that_is_not_a_job_of_ours_is_an_invalid_request() -> None:
    with pytest.raises(InvalidRequest):
        JobData.parse({"prompt": "no envelope"})
    with pytest.raises(InvalidRequest):
        JobData.parse("a string")


def test_a_deadline_expires_only_a_job_that_never_started() -> None:
    data = JobData.submitted(request(startWithinMs=100), provider="p", model="m", tenant="t", now=0)
    assert not data.expired(100)
    assert data.expired(101)
    assert not data.expired(10_000, started_before=True)  # a retry is not a late start
    no_deadline = JobData.submitted(request(), provider="p", model="m", tenant="t", now=0)
    assert not no_deadline.expired(10**12)


def test_one_token_estimate_for_quota_and_budget() -> None:
    asked = request("a" * 41, system="b" * 3, maxTokens=10)
    assert estimate_tokens(asked, default_completion=999) == 11 + 10  # ceil(44 / 4) + maxTokens
    assert estimate_tokens(request("a" * 8), default_completion=5) == 2 + 5
    assert estimate_tokens(request("a" * 8), 5, tokens_per_char=1.0) == 8 + 5
    data = JobData.submitted(asked, provider="p", model="m", tenant="t")
    assert data.estimate_tokens(999) == estimate_tokens(asked, 999)


def test_the_quota_bound_counts_a_token_per_byte() -> None:
    # CJK text is 3 bytes a character: the chars/4 estimate reserved a twelfth of this.
    cjk = GenerateRequest(prompt="漢" * 100, options=GenerateOptions(max_tokens=10))
    assert quota_bound(cjk, default_completion=999) == 300 + MESSAGE_OVERHEAD_TOKENS + 10
    system = GenerateRequest(prompt="ab", options=GenerateOptions(system="xyz"))
    assert quota_bound(system, default_completion=7) == 5 + MESSAGE_OVERHEAD_TOKENS + 7
