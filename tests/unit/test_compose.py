"""compose/: the file is valid YAML and everything it refers to agrees with everything else.

What ``docker compose config`` (tests/unit/test_readme.py, where docker exists) cannot
see: the files it mounts exist, each service's ``--health-port`` is the port its
healthcheck asks and Prometheus scrapes, the dashboard queries metrics the bus
actually exports, under the datasource Grafana is provisioned with.
"""

from __future__ import annotations

import json
import re
from pathlib import Path
from typing import Any

import pytest
import yaml

from banyan_bus.telemetry import Telemetry

COMPOSE_DIR = Path(__file__).resolve().parents[2] / "compose"
COMPOSE = COMPOSE_DIR / "docker-compose.yml"


@pytest.fixture(scope="module")
def compose() -> dict[str, Any]:
    loaded = yaml.safe_load(COMPOSE.read_text(encoding="utf-8"))
    assert isinstance(loaded, dict)
    return loaded


def _health_ports(compose: dict[str, Any]) -> dict[str, int]:
    """service -> the port its ``banyan run --health-port`` listens on."""
    ports = {}
    for name, service in compose["services"].items():
        command = service.get("command") or []
        if "--health-port" in command:
            ports[name] = int(command[command.index("--health-port") + 1])
    return ports


def test_every_service_has_a_pinned_image_or_a_build_that_exists(compose: dict[str, Any]) -> None:
    for name, service in compose["services"].items():
        build = service.get("build")
        if build is not None:
            context = (COMPOSE_DIR / build["context"]).resolve()
            assert context.is_dir(), name
            assert (context / build["dockerfile"]).is_file(), name
        else:
            image = service.get("image", "")
            assert re.fullmatch(r"[\w./-]+:[\w.-]+", image), f"{name}: pin the image: {image!r}"
            assert not image.endswith(":latest"), name


def test_every_mounted_file_exists_and_every_dependency_is_a_service(
    compose: dict[str, Any],
) -> None:
    services = compose["services"]
    for name, service in services.items():
        for volume in service.get("volumes", []):
            source = volume.split(":")[0]
            if source.startswith("."):
                assert (COMPOSE_DIR / source).exists(), f"{name} mounts missing {source}"
            else:
                assert source in compose.get("volumes", {}), f"{name}: undeclared volume {source}"
        depends = service.get("depends_on", [])
        for dependency in depends if isinstance(depends, list) else list(depends):
            assert dependency in services, f"{name} depends on unknown {dependency}"


def test_published_host_ports_are_unique(compose: dict[str, Any]) -> None:
    seen: dict[str, str] = {}
    for name, service in compose["services"].items():
        for mapping in service.get("ports", []):
            host = str(mapping).split(":")[0]
            assert host not in seen, f"{name} and {seen.get(host)} both publish {host}"
            seen[host] = name
    assert {"5672", "15672", "16686", "9090", "3000"} <= set(seen)


def test_each_bus_service_is_probed_and_scraped_on_its_health_port(
    compose: dict[str, Any],
) -> None:
    ports = _health_ports(compose)
    assert set(ports) == {
        "user-service",
        "email-service",
        "analytics-service",
        "notification-service",
    }
    for name, port in ports.items():
        check = " ".join(compose["services"][name]["healthcheck"]["test"])
        assert f"http://127.0.0.1:{port}/readyz" in check, name
    scrape = yaml.safe_load((COMPOSE_DIR / "prometheus" / "prometheus.yml").read_text())
    [job] = scrape["scrape_configs"]
    assert job["metrics_path"] == "/metrics"
    targets = {t for group in job["static_configs"] for t in group["targets"]}
    assert targets == {f"{name}:{port}" for name, port in ports.items()}
    environment = compose["x-env"]
    assert environment["OTEL_METRICS_EXPORTER"] == "prometheus"
    dockerfile = (COMPOSE_DIR / "Dockerfile").read_text()
    assert re.search(r'pip install "\.\[[^\]]*prometheus[^\]]*\]"', dockerfile)


def _exported_metric_names() -> set[str]:
    """The names the OpenTelemetry Prometheus exporter gives the bus's instruments."""
    telemetry = Telemetry("compose-test", "memory")

    def name(attr: str) -> str:
        instrument = getattr(telemetry, attr)  # the API's proxy instruments keep it in _name
        found = getattr(instrument, "name", None) or instrument._name
        return str(found).replace(".", "_")

    names = set()
    for attr in ("published", "handled", "failed", "retried", "dead_lettered", "deduplicated"):
        names.add(name(attr) + "_total")
    for attr in ("duration", "latency"):
        names |= {name(attr) + "_seconds" + suffix for suffix in ("_bucket", "_sum", "_count")}
    names.add(name("in_flight"))
    return names


def test_the_dashboard_queries_metrics_the_bus_exports_from_the_provisioned_datasource() -> None:
    datasources = yaml.safe_load(
        (COMPOSE_DIR / "grafana" / "provisioning" / "datasources" / "prometheus.yml").read_text()
    )
    [datasource] = datasources["datasources"]
    assert datasource["url"] == "http://prometheus:9090"
    provider = yaml.safe_load(
        (COMPOSE_DIR / "grafana" / "provisioning" / "dashboards" / "banyan.yml").read_text()
    )
    assert provider["providers"][0]["options"]["path"] == "/var/lib/grafana/dashboards"
    dashboard = json.loads((COMPOSE_DIR / "grafana" / "dashboards" / "banyan.json").read_text())
    exported = _exported_metric_names()
    used = set()
    for panel in dashboard["panels"]:
        assert panel["datasource"]["uid"] == datasource["uid"], panel["title"]
        for target in panel["targets"]:
            for metric in re.findall(r"\bbanyan_[a-z_]+", target["expr"]):
                if metric in ("banyan_message_type", "banyan_reason"):  # labels
                    continue
                assert metric in exported, f"{panel['title']}: {metric} is not exported"
                used.add(metric)
    assert {
        "banyan_messages_handled_total",
        "banyan_messages_failed_total",
        "banyan_messages_retried_total",
        "banyan_messages_dead_lettered_total",
        "banyan_handler_duration_seconds_bucket",
        "banyan_messages_published_total",
    } <= used
