"""docker-compose.yml stays valid: Docker does not run here, but its parser does."""

from __future__ import annotations

import shutil
import subprocess
from pathlib import Path

import pytest

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
    for service in ("postgres:", "kafka:", "schema:", "relay-a:", "relay-b:"):
        assert f"  {service}" in config
    assert config.count("condition: service_completed_successfully") == 2
    assert config.count("condition: service_healthy") >= 3
    assert "OUTBOX_KAFKA_BOOTSTRAP_SERVERS: kafka:9092" in config
    assert config.count("/healthz") == 2  # each relay has a liveness check of its own
