"""What migration 0008 (the table of published events) does to an existing installation.

PostgreSQL alone. An outbox at migration 0007 holding ``--rows`` events, nine in ten of them
marked published in place (a relay of an earlier version running with ``--retention``), while a
writer commits one event at a time. Then ``migrator.apply`` runs 0008, and before its
transaction commits the relation locks it holds are read from ``pg_locks``. Reported: how long
the migration took, each lock it held on an existing table, the writer's commit latency before
and during the migration, and the rows it moved (none: rows marked in place stay where they
are until they expire).

    .venv/bin/python bench/upgrade.py [--rows 1000000]
"""

from __future__ import annotations

import argparse
import threading
import time
from typing import Any

import common
import psycopg

from outbox import migrator, testing
from outbox.settings import OutboxSettings

BEFORE = 7  # the last migration of the previous release
FILL = """
INSERT INTO outbox_events (event_id, topic, key, payload)
SELECT gen_random_uuid(), 'orders', convert_to('k' || (n %% 1000), 'UTF8'),
       convert_to(repeat('x', 200), 'UTF8')
FROM generate_series(1, %s) AS n
"""
MARK_IN_PLACE = "UPDATE outbox_events SET published_at = now() WHERE id % 10 <> 0"
LOCKS = """
SELECT c.relname, l.mode FROM pg_locks AS l JOIN pg_class AS c ON c.oid = l.relation
WHERE l.pid = pg_backend_pid() AND l.locktype = 'relation' AND c.relname LIKE 'outbox%'
  AND c.relname NOT LIKE 'outbox_published%'
ORDER BY 1, 2
"""
COUNTS = """
SELECT (SELECT count(*) FROM outbox_events WHERE published_at IS NOT NULL),
       (SELECT count(*) FROM outbox_published)
"""


class Writer(threading.Thread):
    """Commits one event at a time; the latency of each commit, with when it started."""

    def __init__(self, url: str) -> None:
        super().__init__(daemon=True)
        self._url = url
        self.samples: list[tuple[float, float]] = []
        self.stop = threading.Event()

    def run(self) -> None:
        with psycopg.connect(self._url) as conn:
            while not self.stop.is_set():
                started = time.monotonic()
                conn.execute(
                    "INSERT INTO outbox_events (event_id, topic, payload)"
                    " VALUES (gen_random_uuid(), 'orders', 'x')"
                )
                conn.commit()
                self.samples.append((started, time.monotonic() - started))
                time.sleep(0.002)

    def between(self, start: float, end: float) -> list[float]:
        return sorted(s for t, s in self.samples if start <= t + s and t <= end)


def measure(rows: int) -> dict[str, Any]:
    settings = OutboxSettings()
    with testing.postgres() as server:
        name = testing.unique_name("bench_upgrade")
        url = testing.create_database(server, name)
        try:
            testing.apply_migrations_up_to(url, BEFORE, settings)
            with psycopg.connect(url, autocommit=True) as conn:
                common.progress(f"upgrade: {rows:,} rows, nine in ten published in place")
                conn.execute(FILL, (rows,))
                conn.execute(MARK_IN_PLACE)
                conn.execute("VACUUM ANALYZE outbox_events")
            writer = Writer(url)
            writer.start()
            time.sleep(3)
            with psycopg.connect(url) as conn:
                started = time.monotonic()
                with conn.transaction():
                    conn.execute("SET LOCAL lock_timeout = 60000")
                    applied = migrator.apply_pending(conn, settings)
                    locks = conn.execute(LOCKS).fetchall()
                took = time.monotonic() - started
                in_place, moved = conn.execute(COUNTS).fetchone() or (0, 0)
            time.sleep(1)
            writer.stop.set()
            writer.join()
        finally:
            testing.drop_database(server, name)
    before = writer.between(writer.samples[0][0], started - 0.5)
    during = writer.between(started, started + took)
    return {
        "rows": rows,
        "applied": [m.label for m in applied],
        "seconds": took,
        "locks": [f"{relation}: {mode}" for relation, mode in locks],
        "writer_before_p50_ms": common.percentile(before, 50) * 1e3,
        "writer_before_max_ms": before[-1] * 1e3,
        "writer_during_commits": len(during),
        "writer_during_max_ms": (during[-1] * 1e3) if during else None,
        "published_in_place_after": int(in_place),
        "moved": int(moved),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rows", type=int, default=1_000_000)
    result = measure(parser.parse_args().rows)
    rows = [
        ("migrations applied", ", ".join(result["applied"])),
        ("rows in the outbox table", f"{result['rows']:,}"),
        ("migration took", f"{result['seconds'] * 1e3:,.0f} ms"),
        ("its locks on existing outbox tables", "; ".join(result["locks"]) or "none"),
        (
            "writer commit p50 / max before",
            f"{result['writer_before_p50_ms']:.2f} / {result['writer_before_max_ms']:.1f} ms",
        ),
        (
            "writer commits during it, slowest",
            f"{result['writer_during_commits']}, "
            + (
                f"{result['writer_during_max_ms']:.1f} ms"
                if result["writer_during_max_ms"] is not None
                else "-"
            ),
        ),
        (
            "rows left marked in place / moved",
            f"{result['published_in_place_after']:,} / {result['moved']:,}",
        ),
    ]
    width = max(len(label) for label, _ in rows)
    for label, value in rows:
        print(f"{label:<{width}}  {value}")


if __name__ == "__main__":
    main()
