"""`flow-api check` (issue 23 item 8): sets up every configured provider, and never prints a
credential."""

from __future__ import annotations

import pytest

from flow_api.embedded import EmbeddedValkey
from tests.operations.conftest import afinish, flow_api

BASE = {"FLOW_LOCAL_ENABLED": "false", "FLOW_PROVIDER_FAKE_ENABLED": "true"}


async def test_check_passes_when_redis_and_the_provider_work(valkey: EmbeddedValkey) -> None:
    code, output = await afinish(flow_api("check", env={**BASE, "FLOW_REDIS_URL": valkey.url}))
    assert code == 0, output


@pytest.mark.parametrize(
    "env",
    [
        {"FLOW_LOCAL_ENABLED": "true", "FLOW_LOCAL_MODEL_PATH": "/nowhere/model.gguf"},
        {
            "FLOW_LOCAL_ENABLED": "true",
            "FLOW_PROVIDER_DEFAULT": "local",
            "FLOW_LOCAL_TEST_FAULT": "abort-at-start",  # a build that crashes at its first use
        },
    ],
    ids=["model path pointing nowhere", "local selected, crashing"],
)
async def test_check_fails_when_the_local_model_cannot_work(
    valkey: EmbeddedValkey, env: dict[str, str]
) -> None:
    import importlib.util

    env = {**BASE, "FLOW_PROVIDER_FAKE_ENABLED": "false", "FLOW_REDIS_URL": valkey.url, **env}
    code, output = await afinish(flow_api("check", env=env))
    assert code == 1, output
    assert "not ok: provider local:" in output, output
    if importlib.util.find_spec("llama_cpp") is None:
        assert "pip install 'flow-api[local]'" in output
    elif "FLOW_LOCAL_MODEL_PATH" in env:
        assert "FLOW_LOCAL_MODEL_PATH='/nowhere/model.gguf' does not exist" in output
    else:
        assert "SIGABRT" in output, output


@pytest.mark.parametrize(
    "url",
    [
        "redis://127.0.0.1:1/0?password=hunter2-secret",
        "redis://:hunter2-secret@127.0.0.1:1/0",
        "redis://flow:hunter2-secret@127.0.0.1:1/0?ssl_password=hunter2-secret",
    ],
)
async def test_check_never_prints_a_password(url: str) -> None:
    code, output = await afinish(flow_api("check", env={**BASE, "FLOW_REDIS_URL": url}))
    assert code == 1, output
    assert "not ok: redis at redis://" in output
    assert "hunter2" not in output
    assert "[redacted]" in output
