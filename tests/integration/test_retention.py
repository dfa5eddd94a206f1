"""The purge of published rows (``--retention``) against a real PostgreSQL: it deletes exactly
the published rows past the retention, never a row that an operator put back meanwhile."""

from __future__ import annotations

import contextlib
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
from outbox_relay.retention import Purge
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
    """``count`` events, recorded as published ``age_s`` seconds ago; their ids."""
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
    assert Purge(3600).run(source, time.monotonic) == (len(old), True)
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
        assert Purge(3600).run(source, time.monotonic) == (len(ids) - 1, True)
        operator.commit()
    assert Purge(3600).run(source, time.monotonic) == (0, True)
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
        old = published(database_url, 20, age_s=7200)
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
    """A housekeeping chore that fails on a good connection (here the relay's role lacks DELETE,
    so every purge fails) is logged and retried later; it never stops the claims."""
    old = published(database_url, 3, age_s=7200)
    role = "purge_test_relay"
    sql = f"""
        CREATE ROLE {role} LOGIN;
        GRANT SELECT, INSERT, UPDATE ON outbox_events TO {role};
        GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relays TO {role};
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
