"""The same fuzzing with authentication on and a worker running: every case carries a valid
API key (made by `flow-api keys create`), so requests get past the key check into validation,
the queue and the job store, while a real `flow-api worker` runs the accepted jobs (fake
provider) and the job states change under the fuzzer."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from typing import Any

import pytest
import requests
from schemathesis import Case

from flow_api.embedded import EmbeddedValkey
from flow_api.settings import AuthSettings
from tests.fuzz.conftest import ThreadedApi
from tests.fuzz.test_openapi_fuzz import CHECKS, SCHEMA, assert_error_body
from tests.support import make_settings
from tests.support.processes import env_for, flow_api, flow_api_command, stop


class AuthedApi(ThreadedApi):
    key: str = ""


@pytest.fixture(scope="module")
def authed_api(valkey: EmbeddedValkey) -> Iterator[AuthedApi]:
    settings = make_settings(valkey.url, auth=AuthSettings(enabled=True))
    env = {**env_for(settings), "FLOW_LOG_LEVEL": "WARNING"}  # the worker's pipe stays small
    created = subprocess.run(
        [
            *flow_api_command("keys", "create", "--tenant", "fuzz", "--name", "fuzzer"),
            *("--requests-per-minute", "0", "--tokens-per-day", "0"),  # no 429s mid-fuzz
        ],
        env={**env_for(settings)},
        capture_output=True,
        text=True,
        timeout=60,
        check=True,
    )
    server = AuthedApi(settings)
    server.key = created.stdout.strip().splitlines()[-1]
    assert server.key.startswith("flow_"), created.stdout
    worker = flow_api("worker", env=env)
    server.start()
    try:
        yield server
    finally:
        server.stop()
        code, output = stop(worker)
        assert code == 0, output[-3000:]


@SCHEMA.parametrize()
def test_every_operation_survives_fuzzing_with_auth_and_a_worker(
    case: Case[Any], authed_api: AuthedApi, http_session: requests.Session
) -> None:
    headers = {"Authorization": f"Bearer {authed_api.key}"}
    response = case.call(
        base_url=authed_api.base_url, session=http_session, timeout=30, headers=headers
    )
    case.validate_response(
        response,
        checks=CHECKS,
        transport_kwargs={
            "base_url": authed_api.base_url,
            "session": http_session,
            "headers": headers,
        },
    )
    assert response.status_code not in (401, 403), response.text  # the key was accepted
    if 400 <= response.status_code < 500:
        assert_error_body(response.status_code, response.json())
