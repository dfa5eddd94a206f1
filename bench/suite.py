"""The benchmark suite: every benchmark of outbox-relay in one run, one table and one JSON file.

Sections (``--only`` takes a comma-separated list of them):

* limits:   the raw producer on the relay's messages; PostgreSQL alone claiming + marking rows
            (DELETE, the move of --retention, the UPDATE of --retention before migration
            0008); the relay's claim beside 1,000,000 retained events and none;
* drain:    one relay draining 100,000 events of 256 B and of 1 KiB, deleting on publish and
            with --retention 3600, against the limits (limits and drain runs interleaved;
            drain always measures the limits too);
* latency:  commit-to-delivery p50/p99 at 200, 2,000 and 10,000 events/s;
* scale:    1, 2 and 4 relays on one backlog; 10,000 against 1,000,000 rows of backlog;
* soak:     writers and a relay for --soak-seconds at 5,000 events/s: latency over time,
            table size, backlog;
* retention: the same with --retention 60, at 5,000, 10,000 and 20,000 events/s for
            --retention-seconds, each beside the same load without a retention: does the
            purge keep the tables bounded?
* writers:  commits/s into the outbox table against a copy without triggers, 1 to 64 clients
            (pgbench), and with migration 0004's triggers (before);
* idle:     an idle relay's CPU and transactions; a lone event after an idle minute;
* fleet:    50 outboxes (databases) served by two relays: latency at 1,000 events/s beside one
            outbox, the other 49 after one database is dropped, a lone event after 10 idle
            minutes, PostgreSQL CPU and connections of the idle fleet;
* writer:   outbox.add against a bare INSERT; add_many's cost and round trips;
* consumer: the consume loop with dedup against without;
* peers:    the relay beside Debezium (PostgreSQL connector, Outbox Event Router, Kafka Connect)
            on one PostgreSQL and one Apache Kafka broker: drain, latency at 200 and 2,000/s,
            CPU and memory; the relay on Apache Kafka against on the suite's broker (needs
            Java and Maven; skipped without them);
* schedule: the drain, the claim and the release beside 100,000 events scheduled for later
            and none (bench/schedule.py);
* memory:   the relay's peak RSS, from the drain, latency, scale and soak runs (no runs of
            its own: it shows what those sections measured).

Each figure is the median of ``--runs`` runs; a relay figure sits next to its baseline from
the same run. Targets are checked against this run's numbers and printed at the end. Servers:
embedded PostgreSQL and Tansu, or OUTBOX_TEST_DATABASE_URL / OUTBOX_TEST_KAFKA_BOOTSTRAP.
Each section module also runs alone (``bench/drain.py``, ``bench/soak.py``, ...).

    .venv/bin/python bench/suite.py [--runs 3] [--only drain,latency] [--quick] [--json PATH]
"""

from __future__ import annotations

import argparse
import datetime
import os
import platform
import subprocess
import sys
import time
import traceback
from collections.abc import Callable
from pathlib import Path
from typing import Any

import common
import consumer
import drain
import fleet
import idle
import latency
import limits
import peers
import retention
import scale
import schedule
import soak
import writer
import writers

from outbox import apache_kafka, testing

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
    "peers",
    "schedule",
    "memory",
)
DEFAULT_JSON = Path(__file__).resolve().parent / "results.json"


def git_revision() -> str:
    root = Path(__file__).resolve().parent.parent

    def git(*argv: str) -> str:
        done = subprocess.run(["git", *argv], cwd=root, check=True, capture_output=True, text=True)
        return done.stdout.strip()

    try:
        head = git("rev-parse", "--short", "HEAD")
        dirty = git("status", "--porcelain", "--untracked-files=no")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"
    return f"{head}{' + uncommitted changes' if dirty else ''}"


def memory_section(results: dict[str, Any]) -> dict[str, Any]:
    """The relay's peak RSS as the other sections measured it (MB)."""
    peaks: dict[str, float] = {}
    for size, r in results.get("drain", {}).get("sizes", {}).items():
        peaks[f"drain, {limits.size_label(size)}"] = r["peak_rss_mb"]
    for rate, r in results.get("latency", {}).get("rates", {}).items():
        peaks[f"latency, {int(rate):,}/s"] = r["relay_peak_rss_mb"]
    for n, r in results.get("scale", {}).get("relays", {}).get("relays", {}).items():
        peaks[f"scale, {n} relay(s), the largest"] = r["peak_rss_mb"]
    for n, r in results.get("scale", {}).get("backlog", {}).get("backlogs", {}).items():
        peaks[f"scale, backlog of {int(n):,} rows"] = r["peak_rss_mb"]
    if "relay_peak_rss_mb" in results.get("soak", {}):
        peaks["soak"] = results["soak"]["relay_peak_rss_mb"]
    return {"peak_rss_mb": peaks, "max_mb": max(peaks.values(), default=0.0)}


def memory_rows(result: dict[str, Any]) -> list[common.Row]:
    return [
        common.Row("memory", f"relay peak RSS during {where}", common.num(mb), "MB")
        for where, mb in result["peak_rss_mb"].items()
    ]


def memory_targets(result: dict[str, Any]) -> list[common.Target]:
    value = result["max_mb"] if result["peak_rss_mb"] else None
    return [common.Target("relay peak RSS, all runs", value, "<", 150, "MB")]


def run_section(name: str, fn: Callable[[], Any], results: dict[str, Any]) -> None:
    """Run one section; a failure is recorded and the suite goes on with the next one."""
    started = time.monotonic()
    common.progress(f"== {name}")
    try:
        fn()
    except Exception as exc:
        traceback.print_exc()
        results.setdefault("errors", {})[name] = f"{type(exc).__name__}: {exc}"
    results.setdefault("section_seconds", {})[name] = round(time.monotonic() - started, 1)


def kafka_label() -> str:
    """The broker the sections run on, as the results name it."""
    if os.environ.get("OUTBOX_TEST_KAFKA_BOOTSTRAP"):
        return "external"
    if testing.kafka_kind() == "apache":
        return f"Apache Kafka {apache_kafka.KAFKA_VERSION}"
    return "Tansu"


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    common.add_option_arguments(parser)
    parser.add_argument("--only", help=f"comma-separated sections: {','.join(SECTIONS)}")
    parser.set_defaults(json_path=str(DEFAULT_JSON))
    args = parser.parse_args()
    opts = common.options_from(args)
    only = [s.strip() for s in args.only.split(",")] if args.only else list(SECTIONS)
    unknown = sorted(set(only) - set(SECTIONS))
    if unknown:
        parser.error(f"unknown section(s) {', '.join(unknown)}; choose from {', '.join(SECTIONS)}")
    if "memory" in only:  # memory shows what the relay runs of other sections measured
        only += ["drain", "soak"]
    if "drain" in only:  # the drain's baseline, measured in the same runs
        only.append("limits")
    selected = [s for s in SECTIONS if s in only]

    started = time.time()
    results: dict[str, Any] = {}
    sections: dict[str, Any] = {}
    with common.servers() as env:
        results["meta"] = {
            "started": datetime.datetime.fromtimestamp(started, datetime.UTC).isoformat(),
            "git": git_revision(),
            "python": platform.python_version(),
            "cpus": os.cpu_count(),
            "postgresql": common.server_version(env),
            "database": "external" if os.environ.get("OUTBOX_TEST_DATABASE_URL") else "embedded",
            "kafka": kafka_label(),
            "options": common.options_dict(opts),
            "sections": selected,
        }
        if "drain" in selected:
            run_section(
                "limits + drain", lambda: sections.update(drain.measure(env, opts)), results
            )
        elif "limits" in selected:
            run_section(
                "limits", lambda: sections.update(limits=limits.measure(env, opts)), results
            )
        steps = {
            "latency": latency.measure,
            "scale": scale.measure,
            "soak": soak.measure,
            "retention": retention.measure,
            "writers": writers.measure,
            "idle": idle.measure,
            "fleet": fleet.measure,
            "writer": writer.measure,
            "consumer": consumer.measure,
            "peers": peers.measure,
            "schedule": schedule.measure,
        }
        for name, measure in steps.items():
            if name in selected:
                run_section(
                    name, lambda m=measure, n=name: sections.update({n: m(env, opts)}), results
                )
    if "memory" in selected:
        sections["memory"] = memory_section(sections)
    results.update(sections)
    results["meta"]["duration_s"] = round(time.time() - started, 1)

    rows: list[common.Row] = []
    found: list[common.Target] = []
    shown = {
        "limits": (limits.rows, None),
        "drain": (drain.rows, drain.targets),
        "latency": (latency.rows, latency.targets),
        "scale": (scale.rows, scale.targets),
        "soak": (soak.rows, soak.targets),
        "retention": (retention.rows, retention.targets),
        "writers": (writers.rows, writers.targets),
        "idle": (idle.rows, idle.targets),
        "fleet": (fleet.rows, fleet.targets),
        "writer": (writer.rows, writer.targets),
        "consumer": (consumer.rows, consumer.targets),
        "peers": (peers.rows, peers.targets),
        "schedule": (schedule.rows, schedule.targets),
        "memory": (memory_rows, memory_targets),
    }
    for name, (to_rows, to_targets) in shown.items():
        if name not in selected:
            continue
        if name in sections:
            rows += to_rows(sections[name])
            found += to_targets(sections[name]) if to_targets else []
        else:
            rows.append(common.Row(name, "FAILED, no figures", "-", "", "see the errors above"))
    results["targets"] = [t.as_dict() for t in found]
    for name, error in results.get("errors", {}).items():
        lines = [line.strip() for line in error.splitlines() if line.strip()]
        summary = lines[0] if len(lines) == 1 else f"{lines[0]} ... {lines[-1]}"
        rows.append(common.Row("error", name, "-", "", summary[:160]))
    meta = results["meta"]
    title = (
        f"outbox-relay benchmarks: median of {opts.runs} run(s); {opts.events:,} events a drain; "
        f"{meta['cpus']} CPUs; PostgreSQL {meta['postgresql']} ({meta['database']}), "
        f"{meta['kafka']}; git {meta['git']}; {meta['duration_s'] / 60:.1f} min"
    )
    common.print_table(title, rows + common.target_rows(found))
    common.write_json(args.json_path, results)
    print(f"results: {args.json_path}")
    return 1 if results.get("errors") else 0


if __name__ == "__main__":
    sys.exit(main())
