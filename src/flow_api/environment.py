"""Settings from the environment, with errors an operator can act on.

`load_settings()` builds `Settings` and turns every problem into one line that names the
variable and the form it expects (pydantic would print a traceback naming the model field).
A `FLOW_*` variable that is no setting is a warning naming the closest one; under `FLOW_AUTH_`
it stops the start, since a misspelled `FLOW_AUTH_ENABLED` leaves the API open.
"""

from __future__ import annotations

import difflib
import os
import re
import types
import typing
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any, cast

from pydantic import AliasChoices, BaseModel, SecretStr, ValidationError
from pydantic.fields import FieldInfo
from pydantic_settings import BaseSettings
from pydantic_settings import SettingsError as SourceError

from flow_api.redaction import redact_url
from flow_api.settings import SECTIONS, Settings
from flow_api.startup import ConfigurationError

PREFIX = "FLOW_"
STRICT_PREFIXES = ("FLOW_AUTH_",)
"""Unknown variables under these prefixes stop the start instead of warning."""


class SettingsInvalid(ConfigurationError):
    """One or more settings cannot be used; `problems` holds one line each."""

    def __init__(self, problems: list[str]) -> None:
        super().__init__("\n".join(problems))
        self.problems = problems

    def __str__(self) -> str:
        # The CLI prints `flow-api: <message>`: every further line gets the same prefix.
        return "\nflow-api: ".join(self.problems)


@dataclass(frozen=True)
class Loaded:
    settings: Settings
    warnings: list[str]


def load_settings(environ: Mapping[str, str] | None = None) -> Loaded:
    """`Settings()` from the environment; raises `SettingsInvalid` listing every problem."""
    env = dict(os.environ if environ is None else environ)
    problems, warnings = unknown_variables(env)
    sections: dict[str, BaseSettings] = {}
    for name, section in SECTIONS.items():
        try:
            sections[name] = section()
        except ValidationError as exc:
            problems.extend(_describe(exc, section, env))
        except SourceError as exc:
            problems.append(_undecodable(exc, section, env))
        if name not in sections:  # defaults, so the remaining settings are checked too
            sections[name] = section.model_construct()
    try:
        settings = Settings(**cast(dict[str, Any], sections))
    except ValidationError as exc:
        problems.extend(_describe(exc, Settings, env))
    if problems:
        raise SettingsInvalid(problems)
    return Loaded(settings, warnings)


def known_variables() -> dict[str, tuple[type[BaseModel], str]]:
    """Every `FLOW_*` variable a setting reads -> (its model, its field)."""
    known: dict[str, tuple[type[BaseModel], str]] = {}
    for name in Settings.model_fields:
        if name not in SECTIONS:
            known[variable(Settings, name)] = (Settings, name)
    for section in SECTIONS.values():
        for name in section.model_fields:
            known[variable(section, name)] = (section, name)
    return known


def variable(model: type[BaseModel], field: str) -> str:
    """The `FLOW_*` variable of `model.field` (its first FLOW_ alias if it has aliases)."""
    info = model.model_fields[field]
    if isinstance(info.validation_alias, AliasChoices):
        for choice in info.validation_alias.choices:
            if isinstance(choice, str) and choice.upper().startswith(PREFIX):
                return choice.upper()
    prefix = str(model.model_config.get("env_prefix", ""))
    return (prefix + field).upper()


# Read by the service but not settings: the model process's parent pid, a test-only fault switch
# (`providers/local_process.py`), and sizes of test runs (`tests/`). Not typos.
NOT_SETTINGS = frozenset(
    {"FLOW_LOCAL_PARENT_PID", "FLOW_LOCAL_TEST_FAULT", "FLOW_SNAPSHOT_JOBS", "FLOW_SOAK_STEPS"}
)


def unknown_variables(env: Mapping[str, str]) -> tuple[list[str], list[str]]:
    """(problems, warnings) for `FLOW_*` variables no setting reads."""
    known = known_variables()
    problems: list[str] = []
    warnings: list[str] = []
    for name in sorted(env):
        upper = name.upper()
        if not upper.startswith(PREFIX) or upper in known or upper in NOT_SETTINGS:
            continue
        close = difflib.get_close_matches(upper, known, n=1, cutoff=0.6)
        hint = f"did you mean {close[0]}?" if close else "no setting has a similar name"
        if upper.startswith(STRICT_PREFIXES):
            problems.append(
                f"{name} is not a setting ({hint}); refusing to start, since a misspelled "
                "authentication setting could leave the API open"
            )
        else:
            warnings.append(f"{name} is not a setting and is ignored ({hint})")
    return problems, warnings


def _describe(exc: ValidationError, model: type[BaseModel], env: Mapping[str, str]) -> list[str]:
    lines = []
    for error in exc.errors(include_url=False):
        loc = [str(part) for part in error["loc"]]
        message = str(error["msg"]).removeprefix("Value error, ")
        if not loc or loc[0] not in model.model_fields:  # a rule across settings
            lines.append(message)
            continue
        name = variable(model, loc[0])
        info = model.model_fields[loc[0]]
        inside = f" (at {'.'.join(loc[1:])})" if len(loc) > 1 else ""
        if not message.startswith("must "):  # our validators say the form themselves
            message += f"; expected {expected(info)}"
        lines.append(f"{name}{_shown(name, info, env)}{inside}: {message}")
    return lines


def _undecodable(exc: SourceError, model: type[BaseModel], env: Mapping[str, str]) -> str:
    found = re.search(r'field "(\w+)"', str(exc))
    if found is None or found.group(1) not in model.model_fields:
        return str(exc)
    info = model.model_fields[found.group(1)]
    name = variable(model, found.group(1))
    return f"{name}{_shown(name, info, env)}: not valid JSON; expected {expected(info)}"


def _shown(name: str, info: FieldInfo, env: Mapping[str, str]) -> str:
    """`='value'` as the operator set it; never the value of a secret."""
    value = next((v for k, v in env.items() if k.upper() == name), None)
    if value is None or _is_secret(info.annotation):
        return ""
    value = redact_url(value)
    return f"={value!r}" if len(value) <= 80 else f"={value[:77]!r}..."


def expected(info: FieldInfo) -> str:
    """The form a setting takes, in words: its type, bounds and what it is for."""
    words = _kind(info.annotation)
    bounds = [
        f"{symbol} {getattr(rule, attr)}"
        for rule in info.metadata
        for attr, symbol in (("ge", ">="), ("gt", ">"), ("le", "<="), ("lt", "<"))
        if getattr(rule, attr, None) is not None
    ]
    if bounds:
        words += " " + " and ".join(bounds)
    if info.description and "FLOW_" not in info.description:
        words += f" ({info.description})"
    return words


def _kind(annotation: Any) -> str:
    origin = typing.get_origin(annotation)
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if origin in (typing.Union, types.UnionType) and len(args) == 1:
        return _kind(args[0])
    if origin is typing.Literal:
        return "one of " + ", ".join(str(a) for a in typing.get_args(annotation))
    if origin is list:
        return 'a JSON list, e.g. ["a", "b"]'
    if origin is dict:
        return "a JSON object"
    simple = {
        bool: "true or false",
        int: "a whole number",
        float: "a number",
        str: "text",
        SecretStr: "a secret",
    }
    return simple.get(annotation, getattr(annotation, "__name__", str(annotation)).lower())


def _is_secret(annotation: Any) -> bool:
    return annotation is SecretStr or SecretStr in typing.get_args(annotation)
