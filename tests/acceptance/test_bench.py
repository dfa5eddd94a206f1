"""The benchmark suite keeps working: ``bench/suite.py --quick`` on tiny sizes, against this
session's servers, writes a JSON file with every section and positive figures. A smoke test: no
timing is asserted. The peers section (Debezium in Kafka Connect, Apache Kafka) runs in a test
of its own: it needs Java and Maven, and starts servers of its own."""

from __future__ import annotations

import json
import math
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import pytest

from outbox import apache_kafka, testing

pytestmark = pytest.mark.kafka

ROOT = Path(__file__).resolve().parents[2]
SECTIONS = (
    "limits",
    "drain",
    "latency",
    "scale",
    "soak",
    "retention",
    "writers",
    "idle",
    "fleet",
    "writer",
    "consumer",
    "memory",
)
PEERS_TIMEOUT = 240


def positive(results: dict[str, Any], *path: str) -> float:
    value: Any = results
    for part in path:
        value = value[part]
    assert isinstance(value, int | float), (path, value)
    assert value > 0, (path, value)
    return float(value)


def test_quick_suite_reports_every_section(
    pg_server: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    out = tmp_path / "results.json"
    env = os.environ | {
        testing.DATABASE_URL_ENV: pg_server,
        testing.KAFKA_BOOTSTRAP_ENV: kafka_bootstrap,
    }
    command = [
        sys.executable,
        str(ROOT / "bench" / "suite.py"),
        "--quick",
        "--only",
        ",".join(SECTIONS),
        "--events",
        "3000",
        "--latency-seconds",
        "2",
        "--soak-seconds",
        "8",
        "--backlog-big",
        "5000",
        "--retention-seconds",
        "6",
        "--consumer-messages",
        "1000",
        "--json",
        str(out),
    ]
    done = subprocess.run(command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=300)
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"
    assert "target" in done.stdout  # the table, with its targets

    results = json.loads(out.read_text())
    assert not results.get("errors")
    assert set(SECTIONS) <= set(results)
    for size in ("256", "1024"):
        for name in ("raw_producer", "pg_claim_delete", "pg_claim_move", "pg_claim_update"):
            positive(results, "limits", "sizes", size, f"{name}_events_per_s")
        positive(results, "limits", "sizes", size, "lower_limit_events_per_s")
        positive(results, "limits", "sizes", size, "move_to_delete")
        # Net of start-up, a tiny drain can be lost in noise (n/a); the wall-time figure is not.
        positive(results, "drain", "sizes", size, "wall_events_per_s")
        assert results["drain"]["sizes"][size]["delivered"] == 3000
        # the same backlog drained with --retention 3600 in the same runs
        positive(results, "drain", "sizes", size, "retention", "wall_events_per_s")
        positive(results, "drain", "sizes", size, "retention", "relay_events_per_s")
        assert results["drain"]["sizes"][size]["retention"]["delivered"] == 3000
    for limit in ("500", "3000"):  # the claim beside none, 5,000 moved, 5,000 marked in place
        for case in ("none", "published_table", "in_place"):
            positive(results, "limits", "claim", "claims", limit, f"{case}_ms")
    for rate in ("200", "2000", "10000"):
        positive(results, "latency", "rates", rate, "p50_ms")
        positive(results, "latency", "rates", rate, "p99_ms")
    for relays in ("1", "2", "4"):
        positive(results, "scale", "relays", "relays", relays, "events_per_s")
    for rows in ("1000", "3000", "5000"):  # small, --events in between, --backlog-big
        positive(results, "scale", "backlog", "backlogs", rows, "events_per_s")
        positive(results, "scale", "backlog", "backlogs", rows, "pg_claim_delete_events_per_s")
    positive(results, "scale", "backlog", "ratio_big_to_small")
    positive(results, "scale", "backlog", "pg_ratio_big_to_small")
    positive(results, "soak", "latency", "p99_ms")
    positive(results, "soak", "size_at_end_bytes")
    positive(results, "soak", "size_after_first_minute_bytes")
    assert results["soak"]["windows"]
    assert all(w["events"] > 0 for w in results["soak"]["windows"])
    positive(results, "retention", "rates", "2000", "latency", "p99_ms")
    positive(results, "retention", "rates", "2000", "baseline", "p99_ms")
    positive(results, "retention", "rates", "2000", "size_ratio")
    positive(results, "retention", "rates", "2000", "size_after_retention_bytes")
    assert results["retention"]["rates"]["2000"]["overdue_max_rows"] >= 0
    assert results["retention"]["rates"]["2000"]["default_partition_rows_max"] == 0
    for case in ("1x1xon", "10x64xon", "1x32xoff"):
        positive(results, "writers", "cases", case, "ratio")
    positive(results, "writers", "cases", "1x32xon", "ratio_before")
    positive(results, "idle", "lone_event_p99_ms")
    positive(results, "idle", "transactions_per_s")
    assert len(results["idle"]["samples"]) == 2
    fleet = results["fleet"]  # 5 outboxes, two relays; one database dropped
    runs = ("single", "all", "others_after", "single_low", "all_low", "others_after_low")
    for run in (*runs, "others_before", "others_before_low"):
        positive(results, "fleet", run, "p99_ms")
    for run in runs:
        assert fleet[run]["missing"] == 0, (run, fleet[run])
    assert fleet["idle"]["lone"]["events"] == 5
    positive(results, "fleet", "idle", "lone", "p99_ms")
    positive(results, "fleet", "idle", "last", "backends_cpu_pct")
    assert fleet["idle"]["connections"]["max_per_outbox"] >= 1
    assert sum(fleet["outboxes_per_relay"].values()) == 5
    positive(results, "writer", "worst_ratio")
    positive(results, "writer", "add_many_1000_round_trips")
    for handler in ("batch", "message"):
        positive(results, "consumer", handler, "with_dedup_msgs_per_s")
        positive(results, "consumer", handler, "without_dedup_msgs_per_s")
    for metrics in ("batches", "one_per_transaction"):
        positive(results, "consumer", "metrics", metrics, "ratio")
    positive(results, "memory", "max_mb")
    assert {t["name"] for t in results["targets"]} >= {
        "relay peak RSS, all runs",
        "soak table size at end / after first minute",
        "fleet p99",
        "fleet idle connections",
    }
    # A target is judged whenever its figure exists; a tiny --quick drain can be lost in
    # start-up noise: then its ratio has no figure (NaN) and no verdict rather than a false one.
    assert all(
        t["met"] is not None or not math.isfinite(t["value"] or math.nan)
        for t in results["targets"]
    )


def test_quick_peers_section(pg_server: str, kafka_bootstrap: str, tmp_path: Path) -> None:
    """``--only peers --quick``: the relay and Debezium each drain and carry a steady load, and
    the relay runs on both brokers; every figure is there and the targets are judged."""
    missing = apache_kafka.java_tools_missing()
    if missing:
        pytest.skip(f"the peers section needs Java and Maven: {missing}")
    out = tmp_path / "results.json"
    env = os.environ | {
        testing.DATABASE_URL_ENV: pg_server,
        testing.KAFKA_BOOTSTRAP_ENV: kafka_bootstrap,
    }
    command = [sys.executable, str(ROOT / "bench" / "suite.py"), "--quick", "--only", "peers"]
    command += ["--events", "3000", "--latency-seconds", "2", "--json", str(out)]
    done = subprocess.run(
        command, cwd=ROOT, env=env, capture_output=True, text=True, timeout=PEERS_TIMEOUT
    )
    assert done.returncode == 0, f"{done.stdout[-4000:]}\n{done.stderr[-4000:]}"

    results = json.loads(out.read_text())
    assert not results.get("errors")
    for system in ("relay", "debezium"):
        positive(results, "peers", "systems", system, "drain", "wall_events_per_s")
        positive(results, "peers", "systems", system, "drain", "cpu_s_per_1000")
        positive(results, "peers", "systems", system, "peak_rss_mb")
        for rate in ("200", "2000"):
            positive(results, "peers", "systems", system, "latency", rate, "p99_ms")
            positive(results, "peers", "systems", system, "latency", rate, "cpu_s_per_1000")
            positive(results, "peers", "systems", system, "latency", rate, "pg_cpu_s_per_1000")
            assert results["peers"]["systems"][system]["latency"][rate]["missing"] == 0
    for broker in ("apache", "embedded"):
        positive(results, "peers", "brokers", broker, "raw_producer_events_per_s")
        positive(results, "peers", "brokers", broker, "relay_p99_ms")
        positive(results, "peers", "brokers", broker, "alone_p99_ms")
    names = {t["name"] for t in results["targets"]}
    assert "relay drain, >= 2 x Debezium's" in names
    assert all(
        t["met"] is not None or not math.isfinite(t["value"] or math.nan)
        for t in results["targets"]
    )
