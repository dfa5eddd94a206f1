"""Releasing scheduled events (migration 0009) through the relay's work connection: which rows
move into the outbox, in what order, what the relay learns of the next due time, and that a
long schedule of future rows costs the release and the claim nothing (the due index)."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest

from outbox_relay import status
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.loop import Relay
from outbox_relay.shards import ShardOwner, lock_class
from outbox_relay.signals import StopSignal
from tests.integration.test_retention import DeliverAll, relay_settings


@pytest.fixture
def settings(database_url: str) -> RelaySettings:
    return RelaySettings(database_url=database_url, kafka_bootstrap_servers="unused:9092")


@pytest.fixture
def source(settings: RelaySettings) -> Iterator[OutboxSource]:
    work = OutboxSource(settings)
    work.connect()
    yield work
    work.close()


def schedule(database_url: str, due_in: list[float], key: str | None = "k") -> list[str]:
    """One scheduled event per entry, due that many seconds from now (database clock), in
    order; returns their event ids."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "INSERT INTO outbox_scheduled (event_id, topic, key, payload, due_at)"
            " SELECT gen_random_uuid(), 'orders', convert_to(%s, 'UTF8'), '{}'::bytea,"
            "        now() + make_interval(secs => d)"
            " FROM unnest(%s::float8[]) WITH ORDINALITY AS u(d, n) ORDER BY n"
            " RETURNING event_id::text",
            (key, due_in),
        ).fetchall()
    return [r[0] for r in rows]


def outbox_ids(database_url: str) -> list[str]:
    """The event ids in the outbox table, in id order."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT event_id::text FROM outbox_events ORDER BY id").fetchall()
    return [r[0] for r in rows]


def scheduled_count(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_scheduled").fetchone()
    assert row is not None
    return int(row[0])


def test_due_rows_move_in_due_order_and_future_rows_stay(
    database_url: str, source: OutboxSource
) -> None:
    """Rows due move into the outbox by due time, ties in scheduling order; the rest stay, and
    the release says how long until the next one on the database's clock."""
    late, tie_a, tie_b, early = schedule(database_url, [-1.0, -5.0, -5.0, -9.0])
    [future] = schedule(database_url, [60.0])
    done = source.release_due(100)
    assert done.released == 4
    assert outbox_ids(database_url) == [early, tie_a, tie_b, late]
    assert done.next_due_in is not None
    assert 55 < done.next_due_in <= 60
    assert scheduled_count(database_url) == 1
    again = source.release_due(100)
    assert again.released == 0
    assert again.next_due_in is not None
    assert future not in outbox_ids(database_url)


def test_a_release_takes_one_batch_and_says_when_more_is_due(
    database_url: str, source: OutboxSource
) -> None:
    """A full batch: the next due time is already past (the relay releases again at once)."""
    schedule(database_url, [-1.0] * 5)
    first = source.release_due(3)
    assert first.released == 3
    assert first.next_due_in is not None
    assert first.next_due_in <= 0
    assert source.release_due(3).released == 2
    last = source.release_due(3)
    assert last == type(last)(0, None)  # nothing scheduled any more


def test_a_release_under_way_elsewhere_makes_others_skip_their_turn(
    database_url: str, settings: RelaySettings, source: OutboxSource
) -> None:
    """Another relay's release (its turn lock held) makes this one release nothing, so the
    two never interleave their inserts; once it ends, this one releases."""
    schedule(database_url, [-1.0])
    with psycopg.connect(database_url) as other:
        other.execute(
            "SELECT pg_try_advisory_xact_lock(%s, 0)", (lock_class(settings.outbox, "release"),)
        )
        skipped = source.release_due(10)
        assert (skipped.released, skipped.next_due_in) == (0, None)
    assert source.release_due(10).released == 1


def test_a_row_locked_by_a_cancel_is_skipped_not_waited_for(
    database_url: str, source: OutboxSource
) -> None:
    """A cancel not committed yet holds its row: the release moves the others."""
    held, free = schedule(database_url, [-2.0, -1.0])
    with psycopg.connect(database_url) as canceller:
        canceller.execute("DELETE FROM outbox_scheduled WHERE event_id = %s", (held,))
        started = time.monotonic()
        assert source.release_due(10).released == 1
        assert time.monotonic() - started < 5
        canceller.rollback()
    assert outbox_ids(database_url) == [free]


def test_the_summary_counts_the_schedule_only(database_url: str, source: OutboxSource) -> None:
    """Waiting rows and the next due time; the backlog (outbox table) counts none of them."""
    assert source.scheduled() == (0, None)
    schedule(database_url, [30.0, 60.0])
    waiting, next_due = source.scheduled()
    assert waiting == 2
    assert next_due is not None
    assert 25 < next_due - time.time() <= 31
    assert source.backlog() == (0, 0.0)


def plan(conn: psycopg.Connection[Any], statement: str) -> dict[str, Any]:
    """The executed plan's top node (EXPLAIN ANALYZE, JSON)."""
    row = conn.execute("EXPLAIN (ANALYZE, BUFFERS, FORMAT JSON) " + statement).fetchone()
    assert row is not None
    data = row[0] if not isinstance(row[0], str) else json.loads(row[0])
    return dict(data[0]["Plan"])


def nodes(node: dict[str, Any]) -> Iterator[dict[str, Any]]:
    yield node
    for child in node.get("Plans", []):
        yield from nodes(child)


def test_a_long_schedule_is_not_scanned(
    database_url: str, settings: RelaySettings, source: OutboxSource
) -> None:
    """100,000 future rows: the release's row selection and its next due time each read the
    due index from its start (as many entries as they return), and the claim reads the outbox
    table only, so none of them looks at the future rows."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO outbox_scheduled (event_id, topic, key, payload, due_at)"
            " SELECT gen_random_uuid(), 'orders', convert_to('k' || (n % 100), 'UTF8'),"
            "        '{}'::bytea, now() + interval '1 hour' + n * interval '1 ms'"
            " FROM generate_series(1, 100000) AS n"
        )
        conn.execute("ANALYZE outbox_scheduled")
    schedule(database_url, [-1.0] * 1000)
    with psycopg.connect(database_url) as conn:
        selection = plan(
            conn,
            # The release's selection, its bound a value as in the function (statement_timestamp
            # stands for it here: stable, so it bounds the scan as the function's variable does)
            "SELECT d.id FROM outbox_scheduled AS d WHERE d.due_at <= statement_timestamp()"
            " ORDER BY d.due_at, d.id LIMIT 1000 FOR UPDATE SKIP LOCKED",
        )
        scans = [n for n in nodes(selection) if "Scan" in n["Node Type"]]
        assert [n["Index Name"] for n in scans] == ["outbox_scheduled_due_idx"]
        assert "due_at <=" in scans[0]["Index Cond"]  # bounded, not filtered
        assert scans[0]["Actual Rows"] == 1000  # the first due entries, none of the future
        first = plan(
            conn, "SELECT s.due_at FROM outbox_scheduled AS s ORDER BY s.due_at, s.id LIMIT 1"
        )
        [scan] = [n for n in nodes(first) if "Scan" in n["Node Type"]]
        assert scan["Index Name"] == "outbox_scheduled_due_idx"
        assert scan["Actual Rows"] == 1
        conn.rollback()
    started = time.perf_counter()
    done = source.release_due(1000)
    seconds = time.perf_counter() - started
    assert done.released == 1000
    assert seconds < 5  # generous: it takes milliseconds; a scan of the schedule would show
    owner = ShardOwner(settings)
    owner.connect()
    try:
        owner.rebalance()
        assert len(source.claim(2000, ownership=owner.ownership)) == 1000
        source.release()
    finally:
        owner.close()


def test_a_release_with_few_rows_due_reads_no_future_row(
    database_url: str, source: OutboxSource
) -> None:
    """One row due, 100,000 in the future, a batch of 500: the release stops at the first
    future entry of the due index instead of reading every future row to fill its batch (it
    did: ``clock_timestamp()`` in the condition could not bound the index scan, only filter
    it). Counted by the index's own statistics of the transaction."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "INSERT INTO outbox_scheduled (event_id, topic, key, payload, due_at)"
            " SELECT gen_random_uuid(), 'orders', NULL, '{}'::bytea,"
            "        now() + interval '1 hour' + n * interval '1 ms'"
            " FROM generate_series(1, 100000) AS n"
        )
        conn.execute("ANALYZE outbox_scheduled")
    schedule(database_url, [-1.0])
    with psycopg.connect(database_url) as conn:
        released, _ = conn.execute("SELECT * FROM outbox_release_due(500)").fetchone() or (0, 0)
        read = conn.execute(
            "SELECT pg_stat_get_xact_tuples_returned('outbox_scheduled_due_idx'::regclass)"
        ).fetchone()
        conn.rollback()
    assert released == 1
    assert read is not None
    assert read[0] < 100, f"{read[0]} entries of the due index read for one due row"


def test_a_relay_step_releases_what_fell_due_and_publishes_it(database_url: str) -> None:
    """The loop's release chore: a relay stepping (a publisher that delivers everything)
    releases a due event before it claims, so the same step publishes it; an event due in
    a moment is released by a later step (the wait ends when it falls due); one due in an hour
    stays scheduled."""
    settings = relay_settings(database_url, batch_size=10)
    stop = StopSignal()
    relay = Relay(settings, DeliverAll(), stop)
    relay.connect()
    try:
        schedule(database_url, [-1.0])
        [_soon, later] = schedule(database_url, [0.3, 3600.0])
        relay.step()  # rebalance, release, claim: the due event goes
        assert relay.totals.published == 1
        started = time.monotonic()
        while relay.totals.published < 2 and time.monotonic() - started < 10:
            relay.step()
        assert relay.totals.published == 2
        assert scheduled_count(database_url) == 1
    finally:
        relay.leave()
        relay.shutdown()
        stop.close()
    assert outbox_ids(database_url) == []  # published rows are deleted (no --retention)
    with psycopg.connect(database_url) as conn:
        left = conn.execute("SELECT event_id::text FROM outbox_scheduled").fetchall()
    assert [r[0] for r in left] == [later]


def test_status_shows_the_schedule(database_url: str) -> None:
    """`status`: the scheduled events beside the backlog (which counts none of them), and when
    the next falls due; an overdue one says how long ago."""
    conn_settings = RelaySettings(database_url=database_url, kafka_bootstrap_servers="unused:9092")

    def read() -> status.Status:
        with psycopg.connect(database_url) as conn:
            return status.read(
                conn, conn_settings.outbox, dead_letters_block=False, retention_kept=False
            )

    empty = read()
    assert (empty.scheduled, empty.next_due_at, empty.next_due_in_seconds) == (0, None, None)
    schedule(database_url, [120.0, 600.0])
    found = read()
    assert (found.scheduled, found.backlog) == (2, 0)
    assert found.next_due_in_seconds is not None
    assert 100 < found.next_due_in_seconds <= 120
    assert found.as_json()["next_due_at"] == found.next_due_at
    assert "scheduled for later            2 (the next due in 0:0" in status.render(found)
    schedule(database_url, [-90.0])
    assert "(the next was due 0:01:30 ago at" in status.render(read())
