"""What does ``outbox.add`` cost over a bare INSERT of the same row on the same connection?

Both sides write the same row (topic, key, ~256-byte JSON payload, one header) into the outbox
table over the same connection. The bare INSERT is the SQL a hand-written outbox would send,
with a fresh ``uuid4`` and a payload serialised by ``json.dumps``; ``outbox.add`` adds
validation, encoding, a UUIDv7 and the transaction check. Two shapes are timed:

* statement: many inserts inside one open transaction (the cost of the call itself);
* transaction: BEGIN, one insert, COMMIT (what an application pays per request).

Runs are interleaved (A, B, A, B, ...) and the median of each is reported, with the ratio. And
``outbox.add_many`` of 1,000 events: its cost per event against 1,000 separate ``add`` calls,
and its round trips to the server, counted in libpq's protocol trace (each Sync or simple Query
message the client sends is one). Runs on an embedded PostgreSQL, or on
``OUTBOX_TEST_DATABASE_URL`` when set.

    .venv/bin/python bench/writer.py [--runs 3] [--json results.json]
"""

from __future__ import annotations

import contextlib
import json
import statistics
import tempfile
import time
import uuid
from collections.abc import Callable
from typing import Any

import common
import psycopg
import sqlalchemy as sa
from sqlalchemy.orm import Session

import outbox
from outbox import urls

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


def cases(
    database_url: str, rows: int, stack: contextlib.ExitStack
) -> dict[str, Callable[[], None]]:
    pg = stack.enter_context(psycopg.connect(database_url))
    engine = sa.create_engine(urls.to_sqlalchemy(database_url))
    stack.callback(engine.dispose)

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


def run(database_url: str, runs: int, rows: int) -> dict[str, Any]:
    timings: dict[str, list[float]] = {}
    with contextlib.ExitStack() as stack:
        suite = cases(database_url, rows, stack)
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


def add_many_round_trips(database_url: str, events: int = 1000) -> int:
    """Round trips of one ``outbox.add_many`` of ``events`` events, in an open transaction:
    the client's Sync and Query messages in libpq's protocol trace."""
    batch = [outbox.Event("orders", PAYLOAD, key=str(i), headers=HEADERS) for i in range(events)]
    with psycopg.connect(database_url) as pg, tempfile.TemporaryFile("w+") as trace:
        with pg.transaction():
            pg.execute("SELECT 1")  # the transaction is open: BEGIN is not add_many's
            pg.pgconn.trace(trace.fileno())
            try:
                outbox.add_many(pg, batch)
            finally:
                pg.pgconn.untrace()
        trace.seek(0)
        sent = [line.split("\t") for line in trace.read().splitlines()]
    return sum(1 for f in sent if len(f) > 3 and f[1] == "F" and f[3] in ("Sync", "Query"))


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    with env.database() as url:
        result = run(url, opts.runs, opts.writer_rows)
        result["add_many_1000_round_trips"] = add_many_round_trips(url, 1000)
    med = result["median_us_per_row"]
    labels = list(med)
    result["ratios"] = {
        add: med[add] / med[bare] for bare, add in zip(labels[::2], labels[1::2], strict=True)
    }
    result["worst_ratio"] = max(result["ratios"].values())
    common.progress(f"writer: ratios {result['ratios']}")
    return result


def rows(result: dict[str, Any]) -> list[common.Row]:
    med = result["median_us_per_row"]
    out = []
    labels = list(med)
    for bare, add in zip(labels[::2], labels[1::2], strict=True):
        out += [
            common.Row("writer", bare, common.num(med[bare], 1), "µs/row", "baseline"),
            common.Row(
                "writer",
                add,
                common.num(med[add], 1),
                "µs/row",
                f"{result['ratios'][add]:.2f} of bare INSERT",
            ),
        ]
    many, single = (
        result["add_many_1000_us_per_event"],
        result["add_1000_separately_us_per_event"],
    )
    out += [
        common.Row(
            "writer",
            "1,000 separate add calls, one transaction",
            common.num(single, 1),
            "µs/event",
            "baseline",
        ),
        common.Row(
            "writer",
            "add_many of 1,000 events",
            common.num(many, 1),
            "µs/event",
            f"{many / single:.2f} of separate adds; "
            f"{result['add_many_1000_round_trips']} round trip(s)",
        ),
    ]
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    return [
        common.Target(
            "outbox.add / bare INSERT (worst of the 3 cases)", result["worst_ratio"], "<=", 1.3
        ),
        common.Target(
            "add_many of 1,000 events: round trips",
            result["add_many_1000_round_trips"],
            "==",
            1,
            digits=0,
        ),
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "writer", measure, rows, targets)
