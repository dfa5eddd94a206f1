"""Dependencies run one way: applications import ``outbox`` without the relay or Kafka client."""

from __future__ import annotations

import json
import subprocess
import sys

OUTBOX_MODULES = [
    "outbox",
    "outbox.cloudevents",
    "outbox.connections",
    "outbox.debezium",
    "outbox.envelope",
    "outbox.errors",
    "outbox.settings",
    "outbox.testing",
    "outbox.tracing",
    "outbox.urls",
    "outbox.writer",
]


def imported_after(*modules: str) -> set[str]:
    """Top-level packages loaded by a fresh interpreter that imports ``modules``."""
    code = (
        "import importlib, json, sys\n"
        f"for m in {list(modules)!r}: importlib.import_module(m)\n"
        "print(json.dumps(sorted(sys.modules)))"
    )
    out = subprocess.run(
        [sys.executable, "-c", code], check=True, capture_output=True, text=True
    ).stdout
    return set(json.loads(out))


def test_outbox_imports_neither_relay_nor_confluent_kafka() -> None:
    """``outbox`` must stay importable by applications that never touch Kafka."""
    loaded = imported_after(*OUTBOX_MODULES)
    offenders = {m for m in loaded if m.split(".")[0] in {"outbox_relay", "confluent_kafka"}}
    assert offenders == set()


def test_importing_outbox_does_not_import_opentelemetry() -> None:
    """OpenTelemetry, when installed, is imported lazily by the first write, not by imports."""
    loaded = imported_after(*OUTBOX_MODULES)
    assert {m for m in loaded if m.split(".")[0] == "opentelemetry"} == set()


def test_outbox_does_not_need_greenlet_for_sync_use() -> None:
    """SQLAlchemy's asyncio extension (which needs greenlet) loads only for async calls."""
    loaded = imported_after("outbox")
    assert "sqlalchemy.ext.asyncio" not in loaded
    assert "greenlet" not in loaded


def test_the_check_can_fail() -> None:
    """The import probe does see a module that is imported (guards against a vacuous test)."""
    assert "outbox_relay.cli" in imported_after("outbox_relay.cli")


def test_the_consume_loops_live_in_the_application_package_without_the_daemon() -> None:
    """An application that only consumes imports ``outbox.consumer`` (which needs the Kafka
    client) and nothing of the relay daemon."""
    loaded = imported_after("outbox.consumer")
    assert "confluent_kafka" in loaded
    assert {m for m in loaded if m.split(".")[0] == "outbox_relay"} == set()
