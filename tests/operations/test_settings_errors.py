"""Bad and misspelled settings (issue 23 items 6-7): one line per problem naming the variable
and the form it expects, exit code 2, for every command; unknown `FLOW_*` variables warned
about with the closest name, and refused under `FLOW_AUTH_`.

The table covers every `FLOW_*` variable a setting reads, built from the settings themselves,
so a setting added later is covered too."""

from __future__ import annotations

import typing
from typing import Any

import pytest
from pydantic import SecretStr

from flow_api.environment import SettingsInvalid, known_variables, load_settings
from tests.operations.conftest import afinish, flow_api

ALL = sorted(known_variables())


def bad_value(variable: str) -> str | None:
    """A value the setting must refuse, or None when every text is valid for it."""
    model, field = known_variables()[variable]
    info = model.model_fields[field]
    annotation: Any = info.annotation
    args = [a for a in typing.get_args(annotation) if a is not type(None)]
    if len(args) == 1 and typing.get_origin(annotation) is not typing.Literal:
        annotation = args[0]
    origin = typing.get_origin(annotation)
    if origin is typing.Literal:
        return "bogus"
    if origin in (list, dict):
        return "not json"
    if annotation in (int, float):
        return "abc"
    if annotation is bool:
        return "maybe"
    if variable in ("FLOW_REDIS_URL", "FLOW_LOG_LEVEL"):
        return "nonsense"
    return None


def misspelled(variable: str) -> str:
    """The variable with one letter of its last word dropped (FLOW_AUTH_ENABLE), the last
    letter unless that spells another setting (FLOW_OPENAI_MODELS -> FLOW_OPENAI_MODES)."""
    head, _, last = variable.rpartition("_")
    for cut in range(len(last) - 1, 0, -1):
        typo = f"{head}_{last[:cut]}{last[cut + 1 :]}"
        if typo not in ALL:
            return typo
    return f"{variable}X"


@pytest.fixture
def clean_env(monkeypatch: pytest.MonkeyPatch) -> pytest.MonkeyPatch:
    import os

    for name in list(os.environ):
        if name.upper().startswith("FLOW_") or name.upper() in _PROVIDER_VARS:
            monkeypatch.delenv(name)
    return monkeypatch


_PROVIDER_VARS = {
    "OPENAI_API_KEY",
    "OPENAI_BASE_URL",
    "ANTHROPIC_API_KEY",
    "ANTHROPIC_BASE_URL",
    "AZURE_OPENAI_API_KEY",
    "AZURE_OPENAI_ENDPOINT",
    "OPENAI_API_VERSION",
}


def test_the_table_covers_the_settings_operators_know() -> None:
    for name in ("FLOW_WORKER_CONCURRENCY", "FLOW_AUTH_ENABLED", "FLOW_LOG_LEVEL"):
        assert name in ALL
    assert len(ALL) > 60


@pytest.mark.parametrize("variable", [v for v in ALL if bad_value(v) is not None])
def test_a_bad_value_is_one_line_naming_the_variable(
    clean_env: pytest.MonkeyPatch, variable: str
) -> None:
    value = bad_value(variable)
    assert value is not None
    clean_env.setenv(variable, value)
    with pytest.raises(SettingsInvalid) as raised:
        load_settings()
    problems = raised.value.problems
    assert len(problems) == 1, problems
    assert problems[0].startswith(variable), problems
    assert "expected" in problems[0] or "must be" in problems[0], problems
    assert "\n" not in problems[0]
    assert raised.value.exit_code == 2


@pytest.mark.parametrize("variable", ALL)
def test_a_misspelled_variable_is_named_with_its_closest_setting(
    clean_env: pytest.MonkeyPatch, variable: str
) -> None:
    typo = misspelled(variable)
    clean_env.setenv(typo, "1")
    if variable.startswith("FLOW_AUTH_"):
        with pytest.raises(SettingsInvalid) as raised:
            load_settings()
        assert raised.value.problems == [
            f"{typo} is not a setting (did you mean {variable}?); refusing to start, since a "
            "misspelled authentication setting could leave the API open"
        ]
    else:
        assert load_settings().warnings == [
            f"{typo} is not a setting and is ignored (did you mean {variable}?)"
        ]


def test_several_problems_are_all_reported(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLOW_WORKER_CONCURRENCY", "abc")
    clean_env.setenv("FLOW_BUDGET_LIMITS", '{"openai/*": {"rpm": 0}}')
    clean_env.setenv("FLOW_LOG_LEVEL", "")
    with pytest.raises(SettingsInvalid) as raised:
        load_settings()
    assert [p.split("=")[0].split(":")[0] for p in raised.value.problems] == [
        "FLOW_WORKER_CONCURRENCY",
        "FLOW_BUDGET_LIMITS",
        "FLOW_LOG_LEVEL",
    ]
    assert "(at openai/*.rpm)" in raised.value.problems[1]


def test_a_secret_is_never_echoed(clean_env: pytest.MonkeyPatch) -> None:
    clean_env.setenv("FLOW_REDIS_URL", "reddis://:hunter2-secret@cache:6379/0")
    with pytest.raises(SettingsInvalid) as raised:
        load_settings()
    assert "hunter2-secret" not in str(raised.value)
    assert "FLOW_REDIS_URL" in str(raised.value)
    secret_fields = [
        v
        for v in ALL
        if known_variables()[v][0].model_fields[known_variables()[v][1]].annotation
        in (SecretStr, SecretStr | None)
    ]
    assert "FLOW_OPENAI_API_KEY" in secret_fields


@pytest.mark.parametrize(
    "command", [["up", "--data-dir", "unused"], ["api"], ["worker"], ["check"], ["keys", "list"]]
)
@pytest.mark.parametrize(
    ("variable", "value"),
    [
        ("FLOW_WORKER_CONCURRENCY", "abc"),
        ("FLOW_AUTH_CORS_ORIGINS", "*"),
        ("FLOW_AUTH_ENABLE", "true"),
    ],
)
async def test_every_command_exits_2_with_one_line(
    command: list[str], variable: str, value: str, tmp_path: Any
) -> None:
    if command[0] == "up":
        command = ["up", "--data-dir", str(tmp_path / "data")]
    code, output = await afinish(flow_api(*command, env={variable: value}))
    assert code == 2, output
    lines = output.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith(f"flow-api: {variable}"), output
    assert not (tmp_path / "data").exists(), "nothing may start on bad settings"


async def test_a_misspelled_variable_warns_in_the_log_and_the_command_runs() -> None:
    code, output = await afinish(
        flow_api(
            "check", env={"FLOW_WORKER_CONCURENCY": "5", "FLOW_REDIS_URL": "redis://127.0.0.1:1/0"}
        )
    )
    assert (
        "FLOW_WORKER_CONCURENCY is not a setting and is ignored (did you mean "
        "FLOW_WORKER_CONCURRENCY?)" in output
    )
    assert code == 1, output  # it ran: the check itself failed (nothing listens on port 1)
