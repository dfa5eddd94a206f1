"""The purge of published rows (``--retention``) against a real PostgreSQL: it deletes exactly
the published rows past the retention, never a row that an operator put back meanwhile."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable, Iterator, Sequence

import psycopg
import pytest

import outbox
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.dead_letters import Selection, replay
from outbox_relay.loop import Relay
from outbox_relay.ports import ClaimedRow, Outcome, Result
from outbox_relay.retention import Purge
from outbox_relay.signals import StopSignal


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


def wait_until_blocked(database_url: str, pid: int) -> None:
    """Until session ``pid`` waits for a row lock (its statement has taken its snapshot)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        for _ in range(1000):
            row = conn.execute(
                "SELECT wait_event_type FROM pg_stat_activity WHERE pid = %s", (pid,)
            ).fetchone()
            if row is not None and row[0] == "Lock":
                return
            time.sleep(0.01)
    pytest.fail(f"session {pid} never waited for a lock")


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
    """The purge's DELETE takes its snapshot while the replay of row X is not committed, and
    then waits for X's row lock; the replay commits; the purge must see that X is no longer
    published (READ COMMITTED re-checks the conditions on the new row version, but only those
    it evaluates on the deleted row itself), and keep it."""
    ids = published(database_url, 5, age_s=7200)
    replayed = ids[2]
    with psycopg.connect(database_url) as operator:
        operator.execute("SELECT 1")  # a transaction, left open by the replay below
        assert replay(operator, source_settings(database_url), Selection(ids=[replayed])) == [
            replayed
        ]
        removed: list[int] = []
        purge = threading.Thread(
            target=lambda: removed.append(Purge(3600).run(source, time.monotonic)[0])
        )
        purge.start()
        wait_until_blocked(database_url, source.connection.info.backend_pid)
        operator.commit()
        purge.join(timeout=30)
    assert not purge.is_alive()
    left = remaining(database_url)
    assert left == {replayed: False}, "the replayed row was purged: it would never be sent"
    assert removed == [len(ids) - 1]


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
    settings = RelaySettings(
        database_url=database_url,
        kafka_bootstrap_servers="unused:9092",
        retention=3600,
        rebalance_interval=0.01,
        poll_interval=0.01,
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
