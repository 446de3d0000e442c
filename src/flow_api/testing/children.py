"""`flow-api` child processes for tests and benchmarks: the environment that rebuilds a
`Settings`, and the command line."""

from __future__ import annotations

import os
import sys

import orjson
from pydantic import SecretStr

from flow_api.settings import SECTIONS, Settings

PROVIDER_KEYS = ("FLOW_", "OPENAI_", "ANTHROPIC_", "AZURE_OPENAI_")
"""Variables of the parent that would change a child's settings: never inherited."""


def env_for(settings: Settings, *, inherit: bool = False, **overrides: str) -> dict[str, str]:
    """The variables that make a child process build the same `Settings` (plus `overrides`).

    With `inherit`, the whole environment of such a child: the parent's own variables, less
    any that configure Flow API or a provider."""
    env = {}
    if inherit:
        env = {k: v for k, v in os.environ.items() if not k.startswith(PROVIDER_KEYS)}
    env["FLOW_LOG_LEVEL"] = settings.log_level
    env["FLOW_LOG_FORMAT"] = settings.log_format
    for section in SECTIONS:
        values = getattr(settings, section)
        prefix = values.model_config["env_prefix"]
        for name in type(values).model_fields:
            value = getattr(values, name)
            if value is None:
                continue
            if isinstance(value, SecretStr):
                value = value.get_secret_value()
            elif isinstance(value, bool):
                value = "true" if value else "false"
            elif isinstance(value, list | dict):
                value = orjson.dumps(value, default=lambda m: m.model_dump(exclude_none=True))
                value = value.decode()
            env[prefix + name.upper()] = str(value)
    env.update(overrides)
    return env


def flow_api_command(*args: str) -> list[str]:
    """`flow-api ARGS`, run by this interpreter."""
    return [sys.executable, "-m", "flow_api.cli", *args]
