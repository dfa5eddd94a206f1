"""Migration 0008 on an installation of the previous release: it waits for no lock on the
outbox table, moves no row, and a relay of this version then keeps the rows an earlier relay
marked published in place (purged in place when they expire, replayable meanwhile)."""

from __future__ import annotations

import time

import psycopg

import outbox
from outbox import migrator, schema, testing
from outbox.settings import OutboxSettings
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.dead_letters import Selection, replay
from outbox_relay.retention import Purge

PREVIOUS_RELEASE = 7


def test_the_migration_waits_for_no_lock_on_the_outbox_and_leaves_rows_in_place(
    empty_database_url: str,
) -> None:
    """A writer's open transaction and an old relay's claimed batch hold the outbox table and
    its rows while the migration (and those after it: 0009, the schedule) runs with a 1 s lock
    timeout: it goes through."""
    url = empty_database_url
    testing.apply_migrations_up_to(url, PREVIOUS_RELEASE)
    with psycopg.connect(url) as conn:
        outbox.add_many(conn, [outbox.Event("orders", {"n": n}, key=f"k{n % 3}") for n in range(9)])
        conn.execute(
            "UPDATE outbox_events SET published_at = now() - interval '2 hours' WHERE id <= 3"
        )
        conn.execute("UPDATE outbox_events SET published_at = now() WHERE id BETWEEN 4 AND 6")
        conn.commit()
    with psycopg.connect(url) as writer, psycopg.connect(url) as old_relay:
        outbox.add(writer, "orders", {"n": "open"})  # uncommitted
        old_relay.execute("SELECT id FROM outbox_events WHERE id > 6 FOR UPDATE SKIP LOCKED")
        with psycopg.connect(url) as conn:
            started = time.monotonic()
            applied = migrator.apply(conn, OutboxSettings(), lock_timeout_ms=1000)
            took = time.monotonic() - started
        # 0008 and every later migration, in one go, as an upgrade from that release runs them
        assert [m.version for m in applied] == list(range(8, schema.latest_version() + 1))
        assert took < 1, f"the migrations waited {took:.1f} s"
        # The old relay marks its batch in place after the migration, as it still does.
        old_relay.execute("UPDATE outbox_events SET published_at = now() WHERE id > 6")
        old_relay.commit()
        writer.commit()
    with psycopg.connect(url) as conn:
        marked = conn.execute(
            "SELECT count(*) FROM outbox_events WHERE published_at IS NOT NULL"
        ).fetchone()
        moved = conn.execute("SELECT count(*) FROM outbox_published").fetchone()
    assert marked == (9,)
    assert moved == (0,)

    source = OutboxSource(
        RelaySettings(database_url=url, kafka_bootstrap_servers="unused:9092", retention=3600)
    )
    source.connect()
    try:
        assert Purge(3600).run(source, time.monotonic).deleted == 3  # the two-hour-old ones
    finally:
        source.close()
    with psycopg.connect(url) as conn:
        assert replay(conn, OutboxSettings(), Selection(ids=[4, 5])) == [4, 5]
        left = conn.execute(
            "SELECT id, published_at IS NOT NULL FROM outbox_events ORDER BY id"
        ).fetchall()
    assert left == [(4, False), (5, False), (6, True), (7, True), (8, True), (9, True), (10, False)]
