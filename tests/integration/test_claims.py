"""The claim query against a real PostgreSQL: which rows a relay may take, and which it must leave.

Per-key order rests on this query: a row is claimed only when no earlier unpublished row of its
key exists outside the batch. The query skips that per-row check when the batch provably holds
every unpublished row of the relay's shards up to its last one ("gapless"); these tests make
gaps of every kind (a row locked by another relay, a row waiting for a retry, a dead letter that
blocks its key, the batch in flight on the other connection) and check both paths.
"""

from __future__ import annotations

import contextlib
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from sqlalchemy.engine import make_url

import outbox
from outbox.settings import OutboxSettings
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.dead_letters import Selection, replay, retry
from outbox_relay.floor import ScanFloor
from outbox_relay.ports import Ownership
from outbox_relay.shards import ShardOwner


@pytest.fixture
def settings(database_url: str) -> RelaySettings:
    return RelaySettings(database_url=database_url, kafka_bootstrap_servers="unused:9092")


@pytest.fixture
def owner(settings: RelaySettings) -> Iterator[ShardOwner]:
    """A relay's ownership session holding all 256 shards."""
    shards = ShardOwner(settings)
    shards.connect()
    shards.rebalance()
    assert len(shards.owned) == 256
    yield shards
    shards.close()


@pytest.fixture
def sources(settings: RelaySettings) -> Iterator[tuple[OutboxSource, OutboxSource]]:
    """The relay's two work connections."""
    first, second = OutboxSource(settings), OutboxSource(settings)
    first.connect()
    second.connect()
    yield first, second
    first.close()
    second.close()


def write(database_url: str, keys: list[str | None]) -> list[int]:
    """One event per entry, in order; returns the row ids."""
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [outbox.Event("orders", {"n": i}, key=k) for i, k in enumerate(keys)])
        conn.commit()
        return [int(r[0]) for r in conn.execute("SELECT id FROM outbox_events ORDER BY id")]


@contextlib.contextmanager
def source_with(database_url: str, **overrides: Any) -> Iterator[OutboxSource]:
    """A work connection of a relay with other settings."""
    source = OutboxSource(
        RelaySettings(database_url=database_url, kafka_bootstrap_servers="unused:9092", **overrides)
    )
    source.connect()
    try:
        yield source
    finally:
        source.close()


def claim(
    source: OutboxSource, owner: ShardOwner | Ownership, limit: int = 100, **extra: Any
) -> list[int]:
    ownership = owner.ownership if isinstance(owner, ShardOwner) else owner
    rows = source.claim(limit, ownership=ownership, **extra)
    return [row.id for row in rows]


def sql(database_url: str, statement: str, params: tuple[object, ...] = ()) -> None:
    with psycopg.connect(database_url) as conn:
        conn.execute(statement, params)


def test_a_gapless_backlog_is_claimed_whole_in_id_order(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """Nothing passed over: every row, keyed or not, in id order, up to the limit."""
    ids = write(database_url, ["a", "b", "a", None, "b", "a"])
    assert claim(sources[0], owner, limit=4) == ids[:4]
    sources[0].release()
    assert claim(sources[0], owner) == ids


def test_a_row_locked_by_another_relay_holds_back_its_key_only(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """The other relay's batch (a plain row lock here) keeps the later rows of its key back."""
    ids = write(database_url, ["a", "b", "a", "b", None])
    with psycopg.connect(database_url) as other:
        other.execute("SELECT 1 FROM outbox_events WHERE id = %s FOR UPDATE", (ids[0],))
        assert claim(sources[0], owner) == [ids[1], ids[3], ids[4]]


def test_a_row_waiting_for_a_retry_holds_back_its_key(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    ids = write(database_url, ["a", "b", "a", "b"])
    sql(
        database_url,
        "UPDATE outbox_events SET attempts = 1,"
        " next_attempt_at = now() + interval '1 hour' WHERE id = %s",
        (ids[1],),
    )
    assert claim(sources[0], owner) == [ids[0], ids[2]]


def test_a_retry_that_is_due_goes_first(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    ids = write(database_url, ["a", "a"])
    sql(
        database_url,
        "UPDATE outbox_events SET attempts = 1,"
        " next_attempt_at = now() - interval '1 second' WHERE id = %s",
        (ids[0],),
    )
    assert claim(sources[0], owner) == ids


@pytest.mark.parametrize(("block", "expected"), [(False, [1, 2]), (True, [1])])
def test_a_dead_letter_blocks_its_key_only_when_configured(
    database_url: str, owner: ShardOwner, block: bool, expected: list[int]
) -> None:
    """proceed: later rows of a dead letter's key flow; block: they wait (other keys flow)."""
    ids = write(database_url, ["a", "b", "a"])
    sql(database_url, "UPDATE outbox_events SET dead_lettered_at = now() WHERE id = %s", (ids[0],))
    with source_with(database_url, dead_letter_blocks_key=block) as source:
        assert claim(source, owner) == [ids[i] for i in expected]


def test_the_batch_in_flight_on_the_other_connection_does_not_hold_back_its_keys(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """The prefetching claim: with the first batch named as in flight, the second connection
    takes the next rows of the same keys; without it, those keys wait."""
    ids = write(database_url, ["a", "b", "a", "b", "c"])
    first, second = sources
    assert claim(first, owner, limit=2) == ids[:2]
    assert claim(second, owner) == [ids[4]]  # a and b are behind rows locked elsewhere
    second.release()
    assert claim(second, owner, in_flight=ids[:2]) == ids[2:]


def test_in_flight_does_not_excuse_other_gaps(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """A key held back by a row that is not in flight stays held back."""
    ids = write(database_url, ["a", "b", "a", "b"])
    first, second = sources
    assert claim(first, owner, limit=1) == ids[:1]
    sql(
        database_url,
        "UPDATE outbox_events SET attempts = 1,"
        " next_attempt_at = now() + interval '1 hour' WHERE id = %s",
        (ids[1],),
    )
    assert claim(second, owner, in_flight=ids[:1]) == [ids[2]]


def test_rows_named_in_flight_are_never_claimed_again(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """The prefetching claim passes over the batch in flight by its ids, not only by its row
    locks: even with those locks gone (the batch ended while the claim ran), its rows are not
    taken a second time into the next batch. (Keeping the order of a key that batch did not
    deliver is the loop's part: it holds back the later rows, see ``held_back``.)"""
    ids = write(database_url, ["a", "b", "a", None])
    first, second = sources
    assert claim(first, owner, limit=2) == ids[:2]
    first.release()  # the locks are gone; the rows are still unpublished
    assert claim(second, owner, in_flight=ids[:2]) == ids[2:]


def test_only_owned_shards_are_claimed(
    database_url: str, settings: RelaySettings, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """A relay that owns no shard claims nothing; rows of a shard it owns are claimed."""
    ids = write(database_url, ["a", "b"])
    shards = ShardOwner(settings)
    shards.connect()
    shards.join()  # a member, holding no shard yet
    try:
        assert claim(sources[0], shards) == []
        sources[0].release()
        with psycopg.connect(database_url) as conn:
            row = conn.execute(
                "SELECT shard FROM outbox_events WHERE id = %s", (ids[1],)
            ).fetchone()
        assert row is not None
        holding = shards.ownership._replace(shards=frozenset({int(row[0])}))
        assert claim(sources[0], holding) == [ids[1]]
    finally:
        shards.close()


def test_exactly_the_owned_shards_are_claimed_the_first_and_last_included(
    database_url: str, settings: RelaySettings, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """Ownership is looked up per shard number: the edges (0 and 255) and a shard between."""
    write(database_url, [None] * 600)  # rows without a key: shard id % 256, every shard
    owned = (0, 17, 255)
    shards = ShardOwner(settings)
    shards.connect()
    shards.join()
    try:
        with psycopg.connect(database_url) as conn:
            expected = [
                int(r[0])
                for r in conn.execute(
                    "SELECT id FROM outbox_events WHERE shard = ANY(%s) ORDER BY id",
                    (list(owned),),
                )
            ]
        assert len(expected) >= 6
        holding = shards.ownership._replace(shards=frozenset(owned))
        assert claim(sources[0], holding, limit=1000) == expected
    finally:
        shards.close()


def test_a_relay_whose_ownership_session_is_gone_claims_nothing(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """Its shard locks went with the session and another relay may hold the shards now: the
    claim takes none of their rows, though the relay still names them, until it reconnects."""
    ids = write(database_url, ["a", "b", None])
    assert claim(sources[0], owner) == ids  # alive: every shard is its own
    sources[0].release()
    ownership = owner.ownership
    with psycopg.connect(database_url, autocommit=True) as admin:
        pid = owner.connection.info.backend_pid
        admin.execute("SELECT pg_terminate_backend(%s, 5000)", (pid,))
    assert claim(sources[0], ownership) == []
    sources[0].release()
    assert claim(sources[1], ownership) == []  # on either work connection
    sources[1].release()
    # A relay that takes the shards over holds them, but claims nothing while the gone relay
    # may still be delivering (.handover)...
    taken_over = ShardOwner(owner._settings)
    taken_over.connect()
    try:
        taken_over.rebalance()
        assert len(taken_over.owned) == 256
        assert claim(sources[0], taken_over) == []
        sources[0].release()
    finally:
        taken_over.close(leave=True)
    # ...and claims its rows once the gone relay's linger is over (as if that time had passed).
    sql(database_url, "UPDATE outbox_relays SET gone_at = gone_at - linger")
    successor = ShardOwner(owner._settings)
    successor.connect()
    try:
        successor.rebalance()
        assert claim(sources[0], successor) == ids
    finally:
        successor.close()


def test_another_relays_membership_does_not_stand_in_for_ours(
    database_url: str,
    owner: ShardOwner,
    settings: RelaySettings,
    sources: tuple[OutboxSource, OutboxSource],
) -> None:
    """The liveness probe is of this relay's own membership lock: naming a member id nobody
    holds claims nothing, even while other members are alive."""
    write(database_url, ["a"])
    stranger = owner.ownership._replace(member_id=owner.member_id + 1)
    assert claim(sources[0], stranger) == []


def test_the_byte_budget_bounds_a_batch_but_the_oldest_row_always_fits(
    database_url: str, owner: ShardOwner
) -> None:
    ids = write(database_url, ["a", "b", "c"])  # payloads of 7 bytes: {"n":0}
    with source_with(database_url, batch_max_bytes=9) as source:
        assert claim(source, owner) == ids[:2]  # 0 bytes before the first, 7 before the second
    with source_with(database_url, batch_max_bytes=1) as source:
        assert claim(source, owner) == ids[:1]


@pytest.mark.parametrize(
    ("overrides", "expected"), [({}, "off"), ({"synchronous_commit": True}, "on")]
)
def test_the_relays_commits_wait_for_the_disk_only_when_configured(
    database_url: str, overrides: dict[str, bool], expected: str
) -> None:
    """Off by default: a relay commit lost in a database crash only means its rows are sent
    again. The application's own sessions are not touched."""
    with source_with(database_url, **overrides) as source:
        row = source.connection.execute("SHOW synchronous_commit").fetchone()
        assert row == (expected,)
    with psycopg.connect(database_url) as app:
        assert app.execute("SHOW synchronous_commit").fetchone() == ("on",)


# --- the scan floor (outbox_relay.floor) -----------------------------------------------------


def floor_after_two_samples(source: OutboxSource) -> int:
    """A relay's floor once two samples agree (the first one alone gives none)."""
    floor = ScanFloor()
    assert floor.update(source.sample_floor(), now=0.0) == 0
    return floor.update(source.sample_floor(), now=1.0)


def publish(source: OutboxSource, owner: ShardOwner, limit: int) -> list[int]:
    """Claim up to ``limit`` rows and record them published (deleted), as a relay would."""
    ids = claim(source, owner, limit=limit)
    source.finish(ids, [])
    return ids


def publish_retained(source: OutboxSource, owner: ShardOwner, limit: int) -> list[int]:
    """Claim up to ``limit`` rows and mark them published in place, as a relay with --retention
    did before migration 0008 (and may still do during an upgrade)."""
    ids = claim(source, owner, limit=limit)
    source.connection.execute(
        "UPDATE outbox_events SET published_at = now() WHERE id = ANY(%s)", (ids,)
    )
    source.connection.commit()
    return ids


def source_settings(database_url: str) -> OutboxSettings:
    return RelaySettings(database_url=database_url, kafka_bootstrap_servers="unused:9092").outbox


def test_the_floor_rises_to_the_oldest_row_still_waiting(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """Claims from the floor take exactly what claims from the start would."""
    ids = write(database_url, ["a", "b", None, "a", "c", None])
    source = sources[0]
    assert publish(source, owner, limit=3) == ids[:3]
    floor = floor_after_two_samples(source)
    assert floor == ids[3]
    assert claim(source, owner, floor=floor) == ids[3:]


def test_with_nothing_waiting_the_floor_is_the_last_id_handed_out(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    ids = write(database_url, ["a", "b"])
    source = sources[0]
    assert publish(source, owner, limit=10) == ids
    floor = floor_after_two_samples(source)
    assert floor == ids[-1]
    later = write(database_url, ["a"])
    assert claim(source, owner, floor=floor) == later


def test_a_row_committed_after_the_samples_below_the_floor_they_saw_is_not_passed_over(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """The case the floor must never get wrong: a transaction takes a row id, stays open while
    later rows are published and samples are taken, then commits. The floor those samples gave
    stays at or below its row, so the next claim takes it, before a later row of its key."""
    source = sources[0]
    with psycopg.connect(database_url) as writer:
        outbox.add(writer, "orders", {"n": 0}, key="k")  # open: not visible yet
        [late] = [int(r[0]) for r in writer.execute("SELECT max(id) FROM outbox_events")]
        after = write(database_url, ["x", "y", "z"])
        assert publish(source, owner, limit=10) == after
        floor = floor_after_two_samples(source)
        assert floor <= late
        writer.commit()
    later_of_its_key = write(database_url, ["k"])[-1]  # (write returns every id there)
    assert claim(source, owner, floor=floor) == [late, later_of_its_key]


def test_a_row_taken_between_two_samples_and_committed_after_them_is_not_passed_over(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """A transaction younger than the first sample holds a row id the second sample cannot see
    while a later row is already visible: the floor stays at the first sample's bound."""
    source = sources[0]
    floor = ScanFloor()
    floor.update(source.sample_floor(), now=0.0)
    with psycopg.connect(database_url) as writer:
        outbox.add(writer, "orders", {"n": 0}, key="k")  # open: not visible yet
        [late] = [int(r[0]) for r in writer.execute("SELECT max(id) FROM outbox_events")]
        [visible] = write(database_url, ["x"])
        assert visible > late
        assert floor.update(source.sample_floor(), now=1.0) <= late
        writer.commit()
    assert claim(source, owner, floor=floor.value) == [late, visible]


def test_a_dead_letter_retried_behind_the_floor_is_claimed_after_the_next_sample(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """A row put back below the floor waits for one sample, never longer."""
    ids = write(database_url, ["a", "b", "c"])
    source = sources[0]
    # Dead-lettered as the relay does it: after a failed attempt, which sets next_attempt_at.
    sql(
        database_url,
        "UPDATE outbox_events SET dead_lettered_at = now(), attempts = 1,"
        " next_attempt_at = now() WHERE id = %s",
        (ids[0],),
    )
    assert publish(source, owner, limit=10) == ids[1:]
    floor = ScanFloor()
    floor.update(source.sample_floor(), now=0.0)
    assert floor.update(source.sample_floor(), now=1.0) > ids[0]
    sql(database_url, "UPDATE outbox_events SET dead_lettered_at = NULL WHERE id = %s", (ids[0],))
    assert floor.update(source.sample_floor(), now=2.0) == ids[0]
    assert not floor.broken  # a row put back is expected below the floor
    assert claim(source, owner, floor=floor.value) == ids[:1]


@pytest.mark.parametrize("put_back", ["replay", "dead-letters retry"])
def test_a_row_put_back_behind_the_floor_holds_back_later_rows_of_its_key(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource], put_back: str
) -> None:
    """A row replayed (or a dead letter retried) below the floor is not claimable until the
    next sample, but a later row of its key must not overtake it meanwhile."""
    ids = write(database_url, ["k", "x", "y"])
    source = sources[0]
    settings = source_settings(database_url)
    if put_back == "replay":
        assert publish_retained(source, owner, limit=10) == ids
    else:
        sql(
            database_url,
            "UPDATE outbox_events SET dead_lettered_at = now() WHERE id = %s",
            (ids[0],),
        )
        assert publish(source, owner, limit=10) == ids[1:]
    floor = floor_after_two_samples(source)
    assert floor > ids[0]
    with psycopg.connect(database_url) as conn:
        if put_back == "replay":
            assert replay(conn, settings, Selection(ids=[ids[0]])) == [ids[0]]
        else:
            assert retry(conn, settings, Selection(ids=[ids[0]]), actor="test") == [ids[0]]
    later_of_its_key, other_key = write(database_url, ["k", "z"])[-2:]
    assert claim(source, owner, floor=floor) == [other_key]
    source.release()
    assert claim(source, owner, floor=0) == [ids[0], later_of_its_key, other_key]


def test_a_sequence_with_a_cache_gives_no_floor(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """Ids from per-session caches can be handed out below the sequence's last value."""
    sql(database_url, "ALTER TABLE outbox_events ALTER COLUMN id SET CACHE 20")
    ids = write(database_url, ["a", "b", "c"])
    source = sources[0]
    assert publish(source, owner, limit=2) == ids[:2]
    assert floor_after_two_samples(source) == 0


def test_the_sequence_bound_needs_no_privilege_on_the_sequence(database_url: str) -> None:
    """The bound is read with the outbox owner's rights (migration 0005), so a relay's role
    needs only its rights on the table; a role that may not even call that function gets a
    clear error, on which the loop turns the floor off (``relay.scan_floor_off``)."""
    ids = write(database_url, ["a", "b"])
    sql(database_url, "CREATE ROLE floor_test_relay LOGIN")
    sql(database_url, "GRANT SELECT, DELETE ON outbox_events TO floor_test_relay")
    limited = make_url(database_url).set(username="floor_test_relay")
    limited_url = limited.render_as_string(hide_password=False)
    try:
        with source_with(limited_url) as source:
            assert source.sample_floor().bound == ids[-1]
            sql(database_url, "REVOKE EXECUTE ON FUNCTION outbox_last_id() FROM PUBLIC")
            with pytest.raises(psycopg.errors.InsufficientPrivilege):
                source.sample_floor()
    finally:
        sql(database_url, "DROP OWNED BY floor_test_relay")
        sql(database_url, "DROP ROLE floor_test_relay")


_HOLD = """
CREATE FUNCTION test_hold() RETURNS trigger LANGUAGE plpgsql AS $$
BEGIN
    PERFORM pg_advisory_lock(4242);
    PERFORM pg_advisory_unlock(4242);
    RETURN NEW;
END $$;
CREATE TRIGGER test_hold BEFORE INSERT ON outbox_events FOR EACH ROW
    WHEN (NEW.key = '\\x686f6c64'::bytea) EXECUTE FUNCTION test_hold();
"""


@contextlib.contextmanager
def insert_holding_its_row_id(database_url: str) -> Iterator[None]:
    """An INSERT (key "hold") that has taken its row id but not yet a transaction id, and stays
    so for the block: a test trigger makes it wait on a lock before its row is written. It
    stands for any statement in that state: a COPY buffering rows (PostgreSQL 18 buffers up to
    1,000 before writing any), a slow BEFORE trigger, a big INSERT ... SELECT. Committed on
    leaving the block. (nextval takes a transaction id when it writes WAL: once per 32 values,
    and at its first call after a checkpoint; then the INSERT is let go and tried again.)"""
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(_HOLD)
        for _ in range(10):
            while admin.execute("SELECT log_cnt FROM outbox_events_id_seq").fetchone() < (2,):
                admin.execute("SELECT nextval('outbox_events_id_seq')")
            admin.execute("SELECT pg_advisory_lock(4242)")
            writer = psycopg.connect(database_url)
            insert = threading.Thread(
                target=outbox.add, args=(writer, "orders", {}), kwargs={"key": "hold"}
            )
            insert.start()
            held = None
            for _ in range(500):  # until it waits in the trigger
                held = admin.execute(
                    "SELECT backend_xid IS NULL FROM pg_stat_activity"
                    " WHERE pid = %s AND wait_event = 'advisory'",
                    (writer.info.backend_pid,),
                ).fetchone()
                if held is not None:
                    break
                time.sleep(0.01)
            try:
                if held == (True,):
                    yield
            finally:
                admin.execute("SELECT pg_advisory_unlock(4242)")
                insert.join()
                writer.commit()
                writer.close()
            if held == (True,):
                admin.execute("DROP TRIGGER test_hold ON outbox_events")
                return
            admin.execute("DELETE FROM outbox_events")  # the row written with a transaction id
    pytest.fail("could not hold a row id without a transaction id in 10 tries")


def test_a_statement_holding_a_row_id_without_a_transaction_id_is_not_passed_over(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """No trigger makes writers take a transaction id before their row ids (migration 0005), so
    an INSERT or COPY can hold row ids that no snapshot shows while a sample reads the sequence.
    The samples see it running a statement without a transaction id, and keep the floor off
    until it is done: its row is claimed first, before a later row of its key."""
    source = sources[0]
    with insert_holding_its_row_id(database_url):
        floor = ScanFloor()
        floor.update(source.sample_floor(floor.suspects), now=0.0)
        [visible] = write(database_url, ["x"])
        assert publish(source, owner, limit=10) == [visible]
        assert floor.update(source.sample_floor(floor.suspects), now=1.0) == 0
        assert floor.update(source.sample_floor(floor.suspects), now=2.0) == 0
    [held] = write(database_url, [])  # (the rows there: the held one; the visible one is gone)
    assert held < visible  # its id was handed out before the first sample read the bound
    later_of_its_key = write(database_url, ["hold"])[-1]
    assert claim(source, owner, floor=floor.value) == [held, later_of_its_key]


def test_the_floor_comes_back_once_the_statement_is_done(
    database_url: str, owner: ShardOwner, sources: tuple[OutboxSource, OutboxSource]
) -> None:
    """A suspect keeps the floor off only while it runs."""
    source = sources[0]
    floor = ScanFloor()
    with insert_holding_its_row_id(database_url):
        first = source.sample_floor(floor.suspects)
        floor.update(first, now=0.0)
        assert floor.suspects  # the INSERT
    ids = write(database_url, [])
    assert publish(source, owner, limit=1000) == ids
    assert floor.update(source.sample_floor(floor.suspects), now=1.0) == first.bound > 0


@pytest.mark.parametrize(
    ("statement", "reason"),
    [
        ("ALTER TABLE outbox_events ALTER COLUMN id RESTART WITH 2", "went back"),
        (
            "INSERT INTO outbox_events (id, event_id, topic, key, payload)"
            " OVERRIDING SYSTEM VALUE VALUES (1, gen_random_uuid(), 'orders', 'k', '\\x00')",
            "written below the floor",
        ),
    ],
)
def test_writers_the_floor_cannot_see_turn_it_off(
    database_url: str,
    owner: ShardOwner,
    sources: tuple[OutboxSource, OutboxSource],
    statement: str,
    reason: str,
) -> None:
    """A sequence restarted, or a row inserted with an id of its own below the floor: the
    next sample notices, and the floor is off (claims start at the beginning)."""
    source = sources[0]
    ids = write(database_url, ["a", "b", "c"])
    sql(database_url, "DELETE FROM outbox_events WHERE id = %s", (ids[0],))
    assert publish(source, owner, limit=10) == ids[1:]
    floor = ScanFloor()
    floor.update(source.sample_floor(), now=0.0)
    assert floor.update(source.sample_floor(), now=1.0) == ids[-1]
    sql(database_url, statement)
    write(database_url, ["k"])
    assert floor.update(source.sample_floor(), now=2.0) == 0
    assert reason in floor.broken
