"""Writers that bypass ``outbox.add`` are published like it, each key in order.

Nothing on the write path asks anything of a writer (no trigger since migration 0005), so a raw
INSERT, a COPY, an ``INSERT ... SELECT`` or a session with ``session_replication_role =
replica`` (where triggers would not even fire) must be published in full and in per-key order,
while a running relay takes its scan-floor samples and waits in ``wait_for_events``. Also the
case the wake-up must get right: a row committed after a later row of the same relay's look.
"""

from __future__ import annotations

import threading
import time
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg

from tests.acceptance.relay_harness import (
    create_topic,
    per_key_order_violations,
    read_topic,
    start_relay,
    stop,
    unpublished,
    wait_until,
)

COLUMNS = "event_id, topic, key, payload, header_names, header_values"


def _rows(topic: str, start: int, count: int, keys: int) -> list[tuple[Any, ...]]:
    return [
        (uuid.uuid4(), topic, f"key-{n % keys}".encode(), b'{"n": %06d}' % n, ["source"], [b"raw"])
        for n in range(start, start + count)
    ]


def _raw_insert(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> None:
    for row in rows:
        conn.execute(f"INSERT INTO outbox_events ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)", row)


def _copy(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> None:
    with conn.cursor().copy(f"COPY outbox_events ({COLUMNS}) FROM STDIN") as copy:
        for row in rows:
            copy.write_row(row)


def _insert_select(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> None:
    conn.execute(
        "CREATE TEMP TABLE staged ON COMMIT DROP AS"
        f" SELECT {COLUMNS} FROM outbox_events WITH NO DATA"
    )
    _raw = f"INSERT INTO staged ({COLUMNS}) VALUES (%s, %s, %s, %s, %s, %s)"
    conn.cursor().executemany(_raw, rows)
    conn.execute(
        f"INSERT INTO outbox_events ({COLUMNS}) SELECT {COLUMNS} FROM staged ORDER BY payload"
    )


def _as_replica(conn: psycopg.Connection[Any], rows: list[tuple[Any, ...]]) -> None:
    conn.execute("SET LOCAL session_replication_role = replica")
    _raw_insert(conn, rows)


WRITERS: list[Callable[[psycopg.Connection[Any], list[tuple[Any, ...]]], None]] = [
    _raw_insert,
    _copy,
    _insert_select,
    _as_replica,
]


def test_raw_inserts_copy_insert_select_and_replica_sessions_are_published_in_key_order(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Four writers at once, each committing batches of rows over the same keys, while the relay
    runs: every row arrives, and each key's rows arrive in the order they became visible."""
    topic = create_topic(kafka_bootstrap)
    proc = start_relay(
        database_url, kafka_bootstrap, "--batch-size", "50", log=tmp_path / "relay.log"
    )
    written: list[str] = []
    lock = threading.Lock()
    errors: list[BaseException] = []

    def write(index: int) -> None:
        try:
            with psycopg.connect(database_url) as conn:
                for batch in range(5):
                    rows = _rows(topic, 1000 * index + 40 * batch, 40, keys=6)
                    with lock:  # commit order is visibility order: record it as committed
                        WRITERS[index](conn, rows)
                        conn.commit()
                        written.extend(str(row[0]) for row in rows)  # id order
                    time.sleep(0.05)
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=write, args=(i,)) for i in range(len(WRITERS))]
    try:
        for thread in threads:
            thread.start()
        for thread in threads:
            thread.join()
        assert errors == []
        wait_until(lambda: unpublished(database_url) == 0, timeout=60)
    finally:
        assert stop(proc) == 0
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(written))
    assert {r.event_id for r in received} == set(written)
    assert per_key_order_violations(received, written) == []


def test_a_row_committed_after_a_later_one_is_published_without_waiting_for_the_poll(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """T1 takes a row id and stays open; T2 takes a later id and commits; the relay publishes
    T2's row and waits, its look's bound past T1's id. T1 commits: the wait sees a row of a
    transaction its snapshot did not show, long before the poll interval (30 s)."""
    topic = create_topic(kafka_bootstrap)
    proc = start_relay(
        database_url, kafka_bootstrap, "--poll-interval", "30", log=tmp_path / "relay.log"
    )
    try:
        with psycopg.connect(database_url) as early, psycopg.connect(database_url) as late:
            [first] = _rows(topic, 0, 1, keys=1)
            [second] = _rows(topic, 1, 1, keys=1)
            _raw_insert(early, [first])  # the lower id, not committed
            _raw_insert(late, [second])
            late.commit()
            wait_until(lambda: unpublished(database_url) == 0, timeout=10)
            time.sleep(0.5)  # the relay is back in its wait, with a look taken after T2
            early.commit()
        wait_until(lambda: unpublished(database_url) == 0, timeout=10)
    finally:
        assert stop(proc) == 0
    received = read_topic(kafka_bootstrap, topic, expect_ids={str(first[0]), str(second[0])})
    assert [r.event_id for r in sorted(received, key=lambda r: r.offset)] == [
        str(second[0]),
        str(first[0]),
    ]
