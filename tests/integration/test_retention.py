"""Retention (``--retention``) against a real PostgreSQL.

A relay with a retention moves the rows it publishes to the table of published events,
partitioned by the time of publication; partitions past the retention are dropped whole, never
one that holds a row an operator is putting back. Rows that earlier versions marked published
in place (``published`` below makes them) are purged in place, with the same guarantees."""

from __future__ import annotations

import contextlib
import datetime as dt
import threading
import time
from collections.abc import Callable, Iterator, Sequence

import psycopg
import pytest
from sqlalchemy import make_url
from structlog.testing import capture_logs

import outbox
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.dead_letters import Selection, replay
from outbox_relay.loop import Relay
from outbox_relay.ports import ClaimedRow, Outcome, Result
from outbox_relay.retention import PARTITIONS_AHEAD, Purge, partition_span
from outbox_relay.signals import StopSignal
from tests.acceptance.relay_harness import wait_until


@pytest.fixture
def source(database_url: str) -> Iterator[OutboxSource]:
    """A relay's work connection, with rows kept for an hour."""
    source = OutboxSource(
        RelaySettings(
            database_url=database_url, kafka_bootstrap_servers="unused:9092", retention=3600
        )
    )
    source.connect()
    yield source
    source.close()


def published(database_url: str, count: int, *, age_s: float) -> list[int]:
    """``count`` events, marked published in place ``age_s`` seconds ago, as relays before
    migration 0008 did; their ids."""
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [outbox.Event("orders", {"n": n}, key=f"k{n}") for n in range(count)])
        rows = conn.execute(
            "UPDATE outbox_events SET published_at = now() - make_interval(secs => %s)"
            " WHERE published_at IS NULL RETURNING id",
            (age_s,),
        ).fetchall()
        conn.commit()
    return sorted(int(r[0]) for r in rows)


def remaining(database_url: str) -> dict[int, bool]:
    """Row id -> published, for every row still in the table."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id, published_at IS NOT NULL FROM outbox_events").fetchall()
    return {int(r[0]): bool(r[1]) for r in rows}


def test_the_purge_deletes_published_rows_past_the_retention_only(
    database_url: str, source: OutboxSource
) -> None:
    old = published(database_url, 5, age_s=7200)
    young = published(database_url, 3, age_s=10)
    with psycopg.connect(database_url) as conn:
        outbox.add(conn, "orders", {"n": "waiting"})
        conn.commit()
    done = Purge(3600).run(source, time.monotonic)
    assert (done.deleted, done.caught_up) == (len(old), True)
    left = remaining(database_url)
    assert sorted(left) == [*young, max(left)]
    assert list(left.values()).count(False) == 1


def test_a_row_replayed_while_the_purge_runs_is_not_deleted(
    database_url: str, source: OutboxSource
) -> None:
    """The replay of row X holds X's lock, uncommitted, while the purge passes: the purge skips
    X without waiting for it (it never waits for a row lock) and deletes the others; once the
    replay commits, X is unpublished and no later pass deletes it."""
    ids = published(database_url, 5, age_s=7200)
    replayed = ids[2]
    with psycopg.connect(database_url) as operator:
        operator.execute("SELECT 1")  # a transaction, left open by the replay below
        assert replay(operator, source_settings(database_url), Selection(ids=[replayed])) == [
            replayed
        ]
        assert Purge(3600).run(source, time.monotonic).deleted == len(ids) - 1
        operator.commit()
    assert Purge(3600).run(source, time.monotonic).deleted == 0
    left = remaining(database_url)
    assert left == {replayed: False}, "the replayed row was purged: it would never be sent"


def source_settings(database_url: str) -> outbox.OutboxSettings:
    return RelaySettings(database_url=database_url, kafka_bootstrap_servers="unused:9092").outbox


class DeliverAll:
    def publish(
        self, rows: Sequence[ClaimedRow], *, should_abort: Callable[[], bool]
    ) -> list[Outcome]:
        return [Outcome(row.id, Result.DELIVERED) for row in rows]

    def settle(self, timeout: float) -> bool:
        return True


def test_of_two_relays_only_the_owner_of_shard_0_purges(database_url: str) -> None:
    """Relays sharing a table never compete for the same rows: one of them purges them all."""
    old = published(database_url, 20, age_s=7200)
    settings = relay_settings(
        database_url, retention=3600, rebalance_interval=0.01, poll_interval=0.01
    )
    stops = [StopSignal(), StopSignal()]
    relays = [Relay(settings, DeliverAll(), stop) for stop in stops]
    try:
        for relay in relays:
            relay.connect()
        for _ in range(50):  # until both own shards (the second one joins a rebalance later)
            for relay in relays:
                relay.step()
            if all(relay.shards.owned for relay in relays):
                break
        assert all(relay.shards.owned for relay in relays)
        for _ in range(3):
            for relay in relays:
                relay.chores.make_due("purge")
                relay.step()
        purged = sorted(relay.totals.purged for relay in relays)
        assert purged == [0, len(old)]
        assert remaining(database_url) == {}
    finally:
        for relay, stop in zip(relays, stops, strict=True):
            relay.leave()
            relay.shutdown()
            stop.close()


def all_published(database_url: str, ids: list[int]) -> Callable[[], bool]:
    """Whether no row of ``ids`` is unpublished (a purged row counts as published)."""

    def check() -> bool:
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT count(*) FROM outbox_events WHERE id = ANY(%s) AND published_at IS NULL",
                (ids,),
            ).fetchone()
        return row == (0,)

    return check


def relay_settings(database_url: str, **overrides: float) -> RelaySettings:
    """A relay's settings for the tests here: fast loops, no broker."""
    options = {"poll_interval": 0.05, "rebalance_interval": 0.05, **overrides}
    return RelaySettings(
        database_url=database_url,
        kafka_bootstrap_servers="unused:9092",
        **options,  # type: ignore[arg-type]
    )


@contextlib.contextmanager
def running(settings: RelaySettings) -> Iterator[Relay]:
    """A relay (publishing to a publisher that delivers everything) running in a thread."""
    stop = StopSignal()
    relay = Relay(settings, DeliverAll(), stop)
    relay.connect()
    thread = threading.Thread(target=relay.run)
    thread.start()
    try:
        yield relay
    finally:
        stop.request("test over")
        thread.join(timeout=30)
        relay.leave()
        relay.shutdown()
        stop.close()


def add_events(database_url: str, count: int) -> list[int]:
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [outbox.Event("orders", {"n": n}, key=f"k{n}") for n in range(count)])
        rows = conn.execute(
            "SELECT id FROM outbox_events WHERE published_at IS NULL ORDER BY id"
        ).fetchall()
    return [int(r[0]) for r in rows]


@pytest.mark.parametrize("lock", ["FOR SHARE", "FOR KEY SHARE", "FOR UPDATE"])
def test_a_lock_on_an_old_published_row_never_stalls_the_relay(
    database_url: str, lock: str
) -> None:
    """An operator's open transaction, an audit job or a foreign key to outbox rows holds a lock
    on an old published row: the purge passes over that row, nothing counts as an outage, and
    events committed meanwhile are published while the lock is held (before: the purge waited
    for it until --lock-timeout, the relay dropped its connections and shards, reconnected, ran
    the purge first and waited again, and published nothing until the lock went)."""
    old = published(database_url, 20, age_s=7200)
    settings = relay_settings(database_url, retention=1, lock_timeout=0.5)
    with capture_logs() as logs, psycopg.connect(database_url) as holder:
        holder.execute(f"SELECT id FROM outbox_events WHERE id = %s {lock}", (old[0],))
        with running(settings):
            fresh = add_events(database_url, 10)
            # Events waited for the lock on an old published row, if not.
            wait_until(all_published(database_url, fresh), timeout=8, interval=0.05)
            purged = old[1:]  # the purge stopped at the locked row, if not
            wait_until(lambda: not set(purged) & set(remaining(database_url)), timeout=8)
            left = remaining(database_url)
        holder.rollback()
    assert old[0] in left, "the locked row was deleted under its lock"
    events = [entry["event"] for entry in logs]
    assert "database.unavailable" not in events
    assert "relay.chore_failed" not in events


def test_a_purge_the_relay_may_not_run_leaves_publishing_going(database_url: str) -> None:
    """A housekeeping chore that fails on a good connection (here the relay's role may not run
    the function that drops expired partitions, so every purge fails) is logged and retried
    later; it never stops the claims."""
    old = published(database_url, 3, age_s=7200)
    role = "purge_test_relay"
    sql = f"""
        CREATE ROLE {role} LOGIN;
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_events TO {role};
        GRANT INSERT ON outbox_published TO {role};
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relays TO {role};
        REVOKE EXECUTE ON FUNCTION outbox_published_expire(interval) FROM PUBLIC;
    """
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(sql)
    limited = make_url(database_url).set(username=role).render_as_string(hide_password=False)
    settings = relay_settings(limited, retention=1)
    try:
        with capture_logs() as logs, running(settings):
            fresh = add_events(database_url, 5)
            wait_until(all_published(database_url, fresh), timeout=8, interval=0.05)
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    assert set(old) <= set(remaining(database_url))
    failures = [entry for entry in logs if entry["event"] == "relay.chore_failed"]
    assert failures
    assert failures[0]["chore"] == "purge"
    assert "permission denied" in failures[0]["error"]
    assert "database.unavailable" not in [entry["event"] for entry in logs]


# The table of published events (migration 0008).


def kept(database_url: str) -> dict[int, str]:
    """Row id -> the partition holding it, for every row of the table of published events."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT id, tableoid::regclass::text FROM outbox_published").fetchall()
    return {int(r[0]): str(r[1]) for r in rows}


def partitions(database_url: str) -> list[tuple[str, dt.datetime, dt.datetime]]:
    """(name, starts, ends) of each range partition, oldest first."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT partition::text, starts, ends FROM outbox_published_partitions()"
        ).fetchall()
    return [(str(r[0]), r[1], r[2]) for r in rows]


def published_at(database_url: str, ids: Sequence[int]) -> list[dt.datetime]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT published_at FROM outbox_published WHERE id = ANY(%s)", (list(ids),)
        ).fetchall()
    return [r[0] for r in rows]


def move(source: OutboxSource, ids: Sequence[int]) -> None:
    """What a relay with a retention does with a delivered batch: its outcome."""
    source.finish(ids, [])


def test_a_relay_with_retention_moves_published_rows_into_partitions_made_ahead(
    database_url: str,
) -> None:
    """Each published row leaves the outbox table for a range partition of the published events,
    unchanged; the partitions reach PARTITIONS_AHEAD spans ahead and are named after the
    second they start at."""
    settings = relay_settings(database_url, retention=3600)
    columns = "id, event_id, topic, key, payload, header_names, header_values, created_at"
    ids = add_events(database_url, 50)
    with psycopg.connect(database_url) as conn:
        before = conn.execute(f"SELECT {columns} FROM outbox_events ORDER BY id").fetchall()
    with running(settings):
        wait_until(lambda: set(kept(database_url)) == set(ids), timeout=8, interval=0.05)
    assert remaining(database_url) == {}
    with psycopg.connect(database_url) as conn:
        after = conn.execute(f"SELECT {columns} FROM outbox_published ORDER BY id").fetchall()
    assert len(before) == 50
    assert after == before
    holders = set(kept(database_url).values())
    assert "outbox_published_default" not in holders
    made = partitions(database_url)
    span = dt.timedelta(seconds=partition_span(3600))
    assert all(ends - starts == span for _, starts, ends in made)
    assert all(name == f"outbox_published_{int(starts.timestamp())}" for name, starts, _ in made)
    assert made[-1][2] >= dt.datetime.now(dt.UTC) + (PARTITIONS_AHEAD - 1) * span


def test_a_partition_is_dropped_whole_once_it_ends_before_the_retention(
    database_url: str, source: OutboxSource
) -> None:
    """A partition goes when its end is older than the retention, not before: so a row is kept
    at least the retention and at most the retention plus one span."""
    assert source.prepare_partitions(1, 4) > 0
    ids = add_events(database_url, 10)
    move(source, ids)
    (holder,) = set(kept(database_url).values())
    ends = next(e for name, _, e in partitions(database_url) if name == holder)
    wait_until(lambda: dt.datetime.now(dt.UTC) > ends + dt.timedelta(seconds=1), timeout=4)
    age_of_end = (dt.datetime.now(dt.UTC) - ends).total_seconds()
    assert source.expire_partitions(age_of_end + 60).partitions == 0  # ends within retention
    assert set(kept(database_url)) == set(ids)
    expiry = source.expire_partitions(age_of_end - 0.5)
    assert expiry.partitions >= 1
    assert kept(database_url) == {}
    assert holder not in [name for name, _, _ in partitions(database_url)]


def test_replay_moves_kept_rows_back_with_their_ids_and_the_relay_sends_them_again(
    database_url: str,
) -> None:
    settings = relay_settings(database_url, retention=3600)
    with running(settings):
        ids = add_events(database_url, 20)
        wait_until(lambda: set(kept(database_url)) == set(ids), timeout=8, interval=0.05)
    with psycopg.connect(database_url) as conn:
        event_ids = dict(conn.execute("SELECT id, event_id FROM outbox_published").fetchall())
        assert replay(conn, source_settings(database_url), Selection(ids=ids[:5])) == ids[:5]
        back = dict(conn.execute("SELECT id, event_id FROM outbox_events").fetchall())
    assert back == {i: event_ids[i] for i in ids[:5]}
    assert set(kept(database_url)) == set(ids[5:])
    with running(settings):
        wait_until(lambda: set(kept(database_url)) == set(ids), timeout=8, interval=0.05)
    assert remaining(database_url) == {}


def test_a_replay_and_the_drop_of_its_partition_never_both_take_a_row(
    database_url: str, source: OutboxSource
) -> None:
    """An operator's replay holds rows of an expired partition, uncommitted: the drop gives up
    at once (it never waits on the replay, nor the relay on it) and reports the partition
    overdue; once the replay commits, the rows are back in the outbox and the next pass drops
    the partition."""
    source.prepare_partitions(1, 4)
    ids = add_events(database_url, 6)
    move(source, ids)
    (holder,) = set(kept(database_url).values())
    ends = next(e for name, _, e in partitions(database_url) if name == holder)
    wait_until(lambda: dt.datetime.now(dt.UTC) > ends + dt.timedelta(seconds=1), timeout=4)
    with psycopg.connect(database_url) as operator:
        operator.execute("SELECT 1")  # a transaction, left open by the replay below
        assert replay(operator, source_settings(database_url), Selection(ids=ids[:2])) == ids[:2]
        started = time.monotonic()
        expiry = source.expire_partitions(0.5)
        waited = time.monotonic() - started
        assert expiry.partitions == 0
        assert expiry.overdue > 0
        assert waited < 2, f"the drop waited {waited:.1f} s for the replay"
        operator.commit()
    assert source.expire_partitions(0.5).partitions >= 1
    assert kept(database_url) == {}
    assert sorted(remaining(database_url)) == ids[:2], "a replayed row was dropped"


def test_rows_with_no_partition_for_their_time_land_in_the_default_one_and_expire_there(
    database_url: str, source: OutboxSource
) -> None:
    """No relay made partitions (none ran with a retention yet): the batch still commits, its
    rows wait in the default partition, later partitions start after them, and the purge
    deletes them one by one once expired."""
    ids = add_events(database_url, 5)
    move(source, ids)
    assert set(kept(database_url).values()) == {"outbox_published_default"}
    assert source.prepare_partitions(1, 4) > 0
    first = partitions(database_url)[0][1]
    assert first > max(published_at(database_url, ids))
    wait_until(lambda: dt.datetime.now(dt.UTC) > first, timeout=3, interval=0.05)
    more = add_events(database_url, 3)
    move(source, more)
    holders = kept(database_url)
    assert {holders[i] for i in ids} == {"outbox_published_default"}
    assert "outbox_published_default" not in {holders[i] for i in more}
    time.sleep(1.0)
    expiry = source.expire_partitions(0.5)
    assert expiry.deleted == len(ids)
    assert not set(ids) & set(kept(database_url))


def test_a_long_read_of_kept_rows_never_stalls_the_relay(database_url: str) -> None:
    """An audit job reads the published events in a long transaction, which the drop of an
    expired partition must wait for: the relay goes on publishing meanwhile, with no outage and
    no failed chore, and drops the partition once the reader is gone."""
    settings = relay_settings(database_url, retention=1)
    with capture_logs() as logs, running(settings) as relay:
        first = add_events(database_url, 10)
        wait_until(lambda: set(first) <= set(kept(database_url)), timeout=8, interval=0.05)
        with psycopg.connect(database_url) as reader:
            reader.execute("SELECT count(*) FROM outbox_published")  # held until rollback
            time.sleep(3)  # the first rows' partition expires meanwhile
            fresh = add_events(database_url, 10)
            wait_until(all_published(database_url, fresh), timeout=8, interval=0.05)
            assert set(first) <= set(kept(database_url))
            reader.rollback()
        wait_until(lambda: not set(first) & set(kept(database_url)), timeout=8, interval=0.1)
        assert relay.totals.partitions_dropped >= 1
    events = [entry["event"] for entry in logs]
    assert "database.unavailable" not in events
    assert "relay.chore_failed" not in events
