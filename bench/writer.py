"""What does ``outbox.add`` cost over a bare INSERT of the same row on the same connection?

Both sides write the same row (topic, key, ~256-byte JSON payload, one header) into the outbox
table over the same connection. The bare INSERT is the SQL a hand-written outbox would send,
with a fresh ``uuid4`` and a payload serialised by ``json.dumps``; ``outbox.add`` adds
validation, encoding, a UUIDv7 and the transaction check. Two shapes are timed:

* statement: many inserts inside one open transaction (the cost of the call itself);
* transaction: BEGIN, one insert, COMMIT (what an application pays per request).

Runs are interleaved (A, B, A, B, ...) and the median of each is reported, with the ratio. Runs
on an embedded PostgreSQL, or on ``OUTBOX_TEST_DATABASE_URL`` when set.

    .venv/bin/python bench/writer.py [--runs 7] [--rows 2000] [--json results.json]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
import uuid
from collections.abc import Callable
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import testing, urls
from outbox.settings import OutboxSettings
from schema import migrator

PAYLOAD = {"order_id": 123456, "customer": "ada", "items": [{"sku": "A-1", "qty": 2}] * 6}
HEADERS = {"content-type": "application/json"}
BARE_SQL = (
    "INSERT INTO outbox_events (event_id, topic, key, payload, header_names, header_values)"
    " VALUES (%s, %s, %s, %s, %s, %s)"
)


def bare_params() -> tuple[object, ...]:
    payload = json.dumps(PAYLOAD, separators=(",", ":")).encode()
    return (uuid.uuid4(), "orders", b"123456", payload, ["content-type"], [b"application/json"])


def timed(fn: Callable[[], None], rows: int) -> float:
    """Microseconds per row."""
    start = time.perf_counter()
    fn()
    return (time.perf_counter() - start) / rows * 1e6


def cases(database_url: str, rows: int) -> dict[str, Callable[[], None]]:
    pg = psycopg.connect(database_url)
    engine = sa.create_engine(urls.to_sqlalchemy(database_url))

    def psycopg_bare_statement() -> None:
        with pg.transaction():
            for _ in range(rows):
                pg.execute(BARE_SQL, bare_params())

    def psycopg_add_statement() -> None:
        with pg.transaction():
            for _ in range(rows):
                outbox.add(pg, "orders", PAYLOAD, key="123456", headers=HEADERS)

    def psycopg_bare_transaction() -> None:
        for _ in range(rows):
            with pg.transaction():
                pg.execute(BARE_SQL, bare_params())

    def psycopg_add_transaction() -> None:
        for _ in range(rows):
            with pg.transaction():
                outbox.add(pg, "orders", PAYLOAD, key="123456", headers=HEADERS)

    def session_bare_statement() -> None:
        with Session(engine) as session, session.begin():
            conn = session.connection()
            for _ in range(rows):
                conn.exec_driver_sql(BARE_SQL, bare_params())

    def session_add_statement() -> None:
        with Session(engine) as session, session.begin():
            for _ in range(rows):
                outbox.add(session, "orders", PAYLOAD, key="123456", headers=HEADERS)

    return {
        "psycopg, in one transaction: bare INSERT": psycopg_bare_statement,
        "psycopg, in one transaction: outbox.add": psycopg_add_statement,
        "psycopg, a transaction each: bare INSERT": psycopg_bare_transaction,
        "psycopg, a transaction each: outbox.add": psycopg_add_transaction,
        "SQLAlchemy Session, one transaction: bare INSERT": session_bare_statement,
        "SQLAlchemy Session, one transaction: outbox.add": session_add_statement,
    }


def add_many_round_trip(database_url: str, rows: int) -> tuple[float, float]:
    """(µs per event for add_many of `rows`, µs per event for `rows` separate adds)."""
    events = [outbox.Event("orders", PAYLOAD, key=str(i), headers=HEADERS) for i in range(rows)]

    with psycopg.connect(database_url) as pg:

        def one_statement() -> None:
            with pg.transaction():
                outbox.add_many(pg, events)

        def one_by_one() -> None:
            with pg.transaction():
                for e in events:
                    outbox.add(pg, e.topic, e.payload, key=e.key, headers=e.headers)

        return timed(one_statement, rows), timed(one_by_one, rows)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--runs", type=int, default=7)
    parser.add_argument("--rows", type=int, default=2000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    with testing.postgres() as server:
        name = testing.unique_name("outbox_bench")
        database_url = testing.create_database(server, name)
        try:
            with psycopg.connect(database_url) as conn:
                migrator.apply(conn, OutboxSettings())
            results = run(database_url, args.runs, args.rows)
        finally:
            testing.drop_database(server, name)
    report(results, args)


def run(database_url: str, runs: int, rows: int) -> dict[str, Any]:
    timings: dict[str, list[float]] = {}
    suite = cases(database_url, rows)
    for fn in suite.values():  # warm-up: connections, prepared statements, caches
        fn()
    for _ in range(runs):
        for label, fn in suite.items():
            timings.setdefault(label, []).append(timed(fn, rows))
    many, single = add_many_round_trip(database_url, 1000)
    return {
        "median_us_per_row": {k: statistics.median(v) for k, v in timings.items()},
        "add_many_1000_us_per_event": many,
        "add_1000_separately_us_per_event": single,
        "runs": runs,
        "rows_per_run": rows,
    }


def report(results: dict[str, Any], args: argparse.Namespace) -> None:
    med = results["median_us_per_row"]
    print(f"\nmedian of {args.runs} interleaved runs of {args.rows} rows each\n")
    print(f"{'case':52} {'µs/row':>9} {'ratio':>7}")
    labels = list(med)
    for bare, add in zip(labels[::2], labels[1::2], strict=True):
        print(f"{bare:52} {med[bare]:9.1f} {'1.00':>7}")
        print(f"{add:52} {med[add]:9.1f} {med[add] / med[bare]:7.2f}")
    many, single = (
        results["add_many_1000_us_per_event"],
        results["add_1000_separately_us_per_event"],
    )
    print(f"\n{'add_many of 1,000 events (one statement)':52} {many:9.1f} {many / single:7.2f}")
    print(f"{'1,000 separate add calls (baseline)':52} {single:9.1f} {'1.00':>7}")
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)


if __name__ == "__main__":
    main()
