"""docker-compose.yml stays valid: Docker does not run here, but its parser does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest
import yaml

from outbox import apache_kafka

ROOT = Path(__file__).resolve().parents[2]


def compose_command() -> list[str] | None:
    """`docker-compose` (Debian's package parses files without an engine), or `docker compose`."""
    if shutil.which("docker-compose"):
        return ["docker-compose"]
    if shutil.which("docker"):
        probe = subprocess.run(["docker", "compose", "version"], capture_output=True, check=False)
        if probe.returncode == 0:
            return ["docker", "compose"]
    return None


def test_compose_file_is_accepted_and_runs_two_relays_after_the_schema() -> None:
    """`config` accepts the file; two relay services run `run`, start after the one-shot schema
    service succeeded and Kafka is healthy; the schema service waits for a healthy PostgreSQL."""
    command = compose_command()
    if command is None:
        pytest.skip("neither docker-compose nor the docker compose plugin is installed")
    result = subprocess.run(
        [*command, "-f", str(ROOT / "docker-compose.yml"), "config"],
        capture_output=True,
        text=True,
        check=False,
        cwd=ROOT,
    )
    assert result.returncode == 0, result.stderr
    config = result.stdout
    for service in ("postgres:", "kafka:", "schema:", "relay-a:", "relay-b:", "billing:"):
        assert f"  {service}" in config
    for service in ("prometheus:", "grafana:"):
        assert f"  {service}" in config
    assert config.count("condition: service_completed_successfully") == 3  # relays, billing
    assert config.count("condition: service_healthy") >= 3
    assert "OUTBOX_KAFKA_BOOTSTRAP_SERVERS: kafka:9092" in config
    assert config.count("/healthz") == 2  # each relay has a liveness check of its own


def test_the_monitoring_services_mount_files_that_exist_and_scrape_the_services_there_are() -> None:
    """Prometheus and Grafana mount the repository's files (no typo in a path leaves a container
    with an empty config); Prometheus scrapes each relay and the consumer on the port that
    service serves its metrics on; Grafana's datasource is that Prometheus and its dashboard
    provider reads the directory the dashboard is mounted in."""
    compose = yaml.safe_load((ROOT / "docker-compose.yml").read_text())
    services = compose["services"]
    mounts: dict[str, str] = {}
    for name in ("prometheus", "grafana", "billing"):
        for volume in services[name]["volumes"]:
            source, target, _mode = volume.split(":")
            assert (ROOT / source).exists(), f"{name} mounts {source}, which does not exist"
            mounts[target] = source

    prometheus = yaml.safe_load((ROOT / mounts["/etc/prometheus/prometheus.yml"]).read_text())
    assert prometheus["rule_files"] == ["/etc/prometheus/outbox-rules.yml"]
    assert mounts["/etc/prometheus/outbox-rules.yml"] == "./deploy/prometheus/outbox-rules.yml"
    jobs = {
        job["job_name"]: [t for c in job["static_configs"] for t in c["targets"]]
        for job in prometheus["scrape_configs"]
    }
    assert jobs == {
        "outbox-relay": ["relay-a:9464", "relay-b:9464"],
        "outbox-consumer": ["billing:9465"],
    }
    for relay in ("relay-a", "relay-b"):
        assert services[relay]["environment"]["OUTBOX_METRICS_PORT"] == "9464"
    assert "--metrics-port=9465" in services["billing"]["command"]

    provisioning = ROOT / mounts["/etc/grafana/provisioning"]
    datasources = yaml.safe_load((provisioning / "datasources" / "prometheus.yml").read_text())
    assert [d["url"] for d in datasources["datasources"]] == ["http://prometheus:9090"]
    providers = yaml.safe_load((provisioning / "dashboards" / "outbox.yml").read_text())
    [provider] = providers["providers"]
    dashboard_target = next(t for t in mounts if t.endswith("outbox-dashboard.json"))
    assert dashboard_target.rsplit("/", 1)[0] == provider["options"]["path"]
    assert mounts[dashboard_target] == "./deploy/grafana/outbox-dashboard.json"
    home = services["grafana"]["environment"]["GF_DASHBOARDS_DEFAULT_HOME_DASHBOARD_PATH"]
    assert home == dashboard_target


def test_the_compose_broker_runs_the_tests_kafka_release_and_settings() -> None:
    """The Compose stack's broker is the Apache Kafka release the tests run
    (``outbox.apache_kafka``), with the same broker settings (listener names aside, which
    differ because Compose's containers need their own)."""
    kafka = yaml.safe_load((ROOT / "docker-compose.yml").read_text())["services"]["kafka"]
    assert kafka["image"] == f"apache/kafka:{apache_kafka.KAFKA_VERSION}"
    compose = {
        name.removeprefix("KAFKA_").lower().replace("_", "."): str(value).lower()
        for name, value in kafka["environment"].items()
    }
    listeners = {
        "controller.listener.names",
        "inter.broker.listener.name",
        "listener.security.protocol.map",
    }
    tests = {k: v for k, v in apache_kafka.broker_settings(1).items() if k not in listeners}
    assert {k: compose.get(k) for k in tests} == tests
