"""Events delivered later: ``deliver_at``/``delay`` write into the scheduled table, ``cancel``
takes an event back, and ``release_due`` (called directly) moves due rows into the outbox,
against a real PostgreSQL."""

from __future__ import annotations

import datetime as dt
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncEngine
from sqlalchemy.orm import Session

import outbox
from outbox.connections import SyncDB
from outbox.envelope import Event, json_serializer, seal
from outbox.settings import OutboxSettings
from outbox.writer import MAX_ROWS_PER_STATEMENT, statements
from tests.integration.connections import (
    ASYNC_KINDS,
    SYNC_KINDS,
    AsyncOpener,
    Opener,
    async_opener,
    async_pgconn_of,
    pgconn_of,
    round_trips,
    sync_opener,
    traced,
)

#: event_id, topic, key, payload, header_names, header_values, due_at
Scheduled = tuple[uuid.UUID, str, bytes | None, bytes, list[str], list[bytes], dt.datetime]
#: event_id, topic, key, payload, header_names, header_values, created_at
Released = tuple[uuid.UUID, str, bytes | None, bytes, list[str], list[bytes], dt.datetime]

COLUMNS = "event_id, topic, key, payload, header_names, header_values"
UTC_PLUS_2 = dt.timezone(dt.timedelta(hours=2))
LATER = dt.datetime(2030, 1, 2, 3, 4, 5, 678901, tzinfo=UTC_PLUS_2)
HOUR = dt.timedelta(hours=1)


def scheduled(database_url: str) -> list[Scheduled]:
    """The scheduled rows as committed, in the order they were scheduled."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            f"SELECT {COLUMNS}, due_at FROM outbox_scheduled ORDER BY id"
        ).fetchall()


def events(database_url: str) -> list[Released]:
    """The outbox rows as committed, in id order."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            f"SELECT {COLUMNS}, created_at FROM outbox_events ORDER BY id"
        ).fetchall()


def release_due(database_url: str, batch: int = 100) -> tuple[int, dt.datetime | None]:
    """One release, in a transaction of its own, as a relay runs it: (released, next_due)."""
    with psycopg.connect(database_url) as conn:
        found = conn.execute("SELECT * FROM outbox_release_due(%s)", (batch,)).fetchone()
    assert found is not None
    return found[0], found[1]


def query(db: SyncDB, sql: str) -> Any:
    """The first column of the first row of ``sql`` on whichever sync connection ``db`` is."""
    if isinstance(db, psycopg.Connection):
        found = db.execute(sql).fetchone()
        assert found is not None
        return found[0]
    if isinstance(db, Session):
        return db.execute(sa.text(sql)).scalar_one()
    assert isinstance(db, Connection)
    return db.exec_driver_sql(sql).scalar_one()


@pytest.fixture(params=SYNC_KINDS)
def transaction(request: pytest.FixtureRequest, engine: sa.Engine, database_url: str) -> Opener:
    """Opens a transaction on one kind of sync connection: commits on exit, rolls back on error."""
    return sync_opener(request.param, engine, database_url)


@pytest.fixture(params=ASYNC_KINDS)
def async_transaction(
    request: pytest.FixtureRequest, async_engine: AsyncEngine, database_url: str
) -> AsyncOpener:
    """Opens a transaction on one kind of async connection."""
    return async_opener(request.param, async_engine, database_url)


class Boom(Exception):
    """Raised inside a transaction to make it roll back."""


# --- writing ------------------------------------------------------------------------------------


def test_deliver_at_stores_the_event_in_the_scheduled_table(
    transaction: Opener, database_url: str
) -> None:
    """The event, encoded as any other, waits in the scheduled table with its due time; the
    outbox table holds nothing."""
    with transaction() as db:
        event_id = outbox.add(
            db, "orders.reminder", {"id": 7}, key="7", headers={"h": "v"}, deliver_at=LATER
        )
    assert isinstance(event_id, uuid.UUID)
    assert scheduled(database_url) == [
        (event_id, "orders.reminder", b"7", b'{"id":7}', ["h"], [b"v"], LATER)
    ]
    assert events(database_url) == []


def test_delay_is_counted_on_the_servers_clock(transaction: Opener, database_url: str) -> None:
    """due_at is the INSERT's statement_timestamp() plus the delay: between the server's clock
    read just before and just after it, in the same transaction; the client's clock plays no
    part."""
    delay = dt.timedelta(hours=3, microseconds=5)
    with transaction() as db:
        before = query(db, "SELECT statement_timestamp()")
        event_id = outbox.add(db, "orders", b"x", delay=delay)
        after = query(db, "SELECT statement_timestamp()")
        due = query(db, f"SELECT due_at FROM outbox_scheduled WHERE event_id = '{event_id}'")
    assert before + delay <= due <= after + delay
    assert [r[0] for r in scheduled(database_url)] == [event_id]


def test_a_due_time_in_the_past_and_a_zero_delay_are_accepted(database_url: str) -> None:
    """Both wait for the relay's next look: there is no lower bound."""
    past = dt.datetime(2001, 1, 1, tzinfo=dt.UTC)
    with psycopg.connect(database_url) as conn:
        first = outbox.add(conn, "t", b"1", deliver_at=past)
        second = outbox.add(conn, "t", b"2", delay=dt.timedelta(0))
    rows = scheduled(database_url)
    assert [(r[0], r[6] == past) for r in rows] == [(first, True), (second, False)]


def test_rollback_leaves_nothing(transaction: Opener, database_url: str) -> None:
    """Scheduled events of a transaction that rolls back are never stored."""

    def write_then_fail() -> None:
        with transaction() as db:
            outbox.add(db, "orders", b"1", deliver_at=LATER)
            outbox.add(db, "orders", b"2", delay=HOUR)
            outbox.add_many(db, [Event("orders", b"3", delay=HOUR), Event("orders", b"4")])
            raise Boom

    with pytest.raises(Boom):
        write_then_fail()
    assert scheduled(database_url) == []
    assert events(database_url) == []


def test_add_many_mixing_keeps_each_tables_order(transaction: Opener, database_url: str) -> None:
    """Immediate events go to the outbox and delayed ones to the scheduled table, each in the
    order given; the ids come back in the order of the events."""
    given = [
        Event("a", b"now-1", key="k"),
        Event("a", b"later-1", key="k", delay=HOUR),
        Event("a", b"now-2", headers={"x": "1"}),
        Event("b", b"later-2", key=b"\x00", headers={"y": b"2"}, deliver_at=LATER),
        Event("a", b"later-3", delay=dt.timedelta(0)),
        Event("a", b"now-3"),
    ]
    with transaction() as db:
        ids = outbox.add_many(db, given)
    assert len(set(ids)) == 6
    assert [r[:6] for r in events(database_url)] == [
        (ids[0], "a", b"k", b"now-1", [], []),
        (ids[2], "a", None, b"now-2", ["x"], [b"1"]),
        (ids[5], "a", None, b"now-3", [], []),
    ]
    rows = scheduled(database_url)
    assert [r[:6] for r in rows] == [
        (ids[1], "a", b"k", b"later-1", [], []),
        (ids[3], "b", b"\x00", b"later-2", ["y"], [b"2"]),
        (ids[4], "a", None, b"later-3", [], []),
    ]
    assert rows[1][6] == LATER


def test_delayed_events_are_split_like_the_others(database_url: str, tmp_path: Path) -> None:
    """5,001 delayed events and 2 immediate ones take three INSERTs: two into the scheduled
    table (at most 5,000 rows each), one into the outbox; every row in order."""
    later = [Event("bulk", str(n), delay=HOUR) for n in range(MAX_ROWS_PER_STATEMENT + 1)]
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1")
        with traced(pgconn_of(conn), tmp_path / "big.trace") as sent:
            ids = outbox.add_many(conn, [Event("now", b"0"), *later, Event("now", b"1")])
    assert (round_trips(sent), sent["Execute"]) == (3, 3)
    assert [r[0] for r in events(database_url)] == [ids[0], ids[-1]]
    rows = scheduled(database_url)
    assert [r[0] for r in rows] == ids[1:-1]
    assert [r[3] for r in rows] == [str(n).encode() for n in range(len(later))]


def test_the_statements_of_a_mix_fit_postgresqls_parameter_limit() -> None:
    """Pure: each statement's parameters match its placeholders and stay under 65,535."""
    settings = OutboxSettings()
    envelopes = [
        seal(
            Event("t", b"", delay=HOUR if n % 3 else None),
            settings=settings,
            serializer=json_serializer,
        )
        for n in range(12_000)
    ]
    built = list(statements(settings, envelopes))
    assert [sql.split(" (")[0] for sql, _ in built] == [
        'INSERT INTO "public"."outbox_events"',
        'INSERT INTO "public"."outbox_scheduled"',
        'INSERT INTO "public"."outbox_scheduled"',
    ]
    assert all(sql.count("%s") == len(params) < 65_535 for sql, params in built)


# --- bad schedules ------------------------------------------------------------------------------

BAD_SCHEDULES = [
    pytest.param({"deliver_at": dt.datetime(2030, 1, 1)}, "naive datetime", id="naive"),
    pytest.param({"delay": dt.timedelta(seconds=-1)}, "must not be negative", id="negative"),
    pytest.param({"deliver_at": LATER, "delay": HOUR}, "not both", id="both"),
    pytest.param({"deliver_at": "2030-01-01T00:00Z"}, "got str", id="deliver-at-str"),
    pytest.param({"deliver_at": dt.date(2030, 1, 1)}, "got date", id="deliver-at-date"),
    pytest.param({"delay": 60}, "must be a datetime.timedelta, got int", id="delay-int"),
    pytest.param({"delay": dt.timedelta.max}, "past the year 9999", id="delay-too-long"),
]


@pytest.mark.parametrize(("bad", "message"), BAD_SCHEDULES)
def test_a_bad_schedule_is_refused_before_any_io(
    transaction: Opener, database_url: str, tmp_path: Path, bad: dict[str, Any], message: str
) -> None:
    """Nothing reaches the server, add_many writes none of its events, and the transaction
    goes on."""
    with transaction() as db:
        query(db, "SELECT 1")
        with traced(pgconn_of(db), tmp_path / "add.trace") as sent:
            with pytest.raises(outbox.InvalidScheduleError, match=message):
                outbox.add(db, "orders", b"x", **bad)
            with pytest.raises(outbox.InvalidScheduleError, match=message):
                outbox.add_many(db, [Event("orders", b"ok", delay=HOUR), Event("o", b"x", **bad)])
        assert sent == Counter()
        good = outbox.add(db, "orders", b"good", delay=HOUR)
    assert [r[0] for r in scheduled(database_url)] == [good]
    assert events(database_url) == []


def test_the_schedule_error_is_an_invalid_event_error() -> None:
    """Callers catching InvalidEventError (or ValueError) catch it too."""
    assert issubclass(outbox.InvalidScheduleError, outbox.InvalidEventError)
    assert issubclass(outbox.InvalidScheduleError, ValueError)


# --- cancel -------------------------------------------------------------------------------------


def schedule_one(database_url: str, **when: Any) -> uuid.UUID:
    """Schedule one event (due in an hour unless told) and commit."""
    with psycopg.connect(database_url) as conn:
        return outbox.add(conn, "orders", b"x", **(when or {"delay": HOUR}))


def test_cancel_returns_true_then_false(transaction: Opener, database_url: str) -> None:
    """The first cancel deletes the row; a second, as a str id, finds nothing."""
    event_id = schedule_one(database_url)
    with transaction() as db:
        assert outbox.cancel(db, event_id) is True
        assert outbox.cancel(db, str(event_id)) is False
    assert scheduled(database_url) == []


def test_cancel_of_an_unknown_or_immediate_event_is_false(
    transaction: Opener, database_url: str
) -> None:
    """An id never scheduled, or of an event in the outbox table, is not cancelled: False, and
    the outbox row stays."""
    with psycopg.connect(database_url) as conn:
        now = outbox.add(conn, "orders", b"now")
    with transaction() as db:
        assert outbox.cancel(db, uuid.uuid4()) is False
        assert outbox.cancel(db, now) is False
    assert [r[0] for r in events(database_url)] == [now]


def test_a_cancel_rolled_back_keeps_the_row(transaction: Opener, database_url: str) -> None:
    """cancel never commits: rolled back, the event is still scheduled."""
    event_id = schedule_one(database_url)

    def cancel_then_fail() -> None:
        with transaction() as db:
            assert outbox.cancel(db, event_id) is True
            raise Boom

    with pytest.raises(Boom):
        cancel_then_fail()
    assert [r[0] for r in scheduled(database_url)] == [event_id]


@pytest.mark.parametrize(
    ("event_id", "message"),
    [
        pytest.param("not-a-uuid", "'not-a-uuid' is not a UUID", id="str"),
        pytest.param(42, "must be a uuid.UUID or str, got int", id="int"),
        pytest.param(None, "got NoneType", id="none"),
    ],
)
def test_a_malformed_id_is_refused_before_any_io(
    database_url: str, tmp_path: Path, event_id: object, message: str
) -> None:
    """The error names the problem; nothing is sent, the transaction goes on."""
    kept = schedule_one(database_url)
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1")
        with (
            traced(pgconn_of(conn), tmp_path / "cancel.trace") as sent,
            pytest.raises(outbox.InvalidScheduleError, match=message),
        ):
            outbox.cancel(conn, event_id)  # type: ignore[arg-type]
        assert sent == Counter()
        assert outbox.cancel(conn, kept) is True
    assert scheduled(database_url) == []


def test_an_outbox_instance_cancels_in_its_own_settings(database_url: str) -> None:
    """Outbox.add and Outbox.cancel, the methods behind the module-level functions."""
    writer = outbox.Outbox(OutboxSettings())
    with psycopg.connect(database_url) as conn:
        event_id = writer.add(conn, "t", b"x", deliver_at=LATER)
        assert writer.cancel(conn, event_id) is True
    assert scheduled(database_url) == []


def test_the_documented_grants_are_enough(database_url: str) -> None:
    """A role with only the grants docs/writing-events.md lists writes, schedules and cancels."""
    role = f"outbox_app_{uuid.uuid4().hex[:8]}"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(f"CREATE ROLE {role} LOGIN")
        try:
            admin.execute(f"GRANT USAGE ON SCHEMA public TO {role}")
            admin.execute(f"GRANT INSERT ON outbox_events TO {role}")
            admin.execute(f"GRANT INSERT, DELETE, SELECT (event_id) ON outbox_scheduled TO {role}")
            with psycopg.connect(database_url, user=role) as app:
                outbox.add(app, "t", b"now")
                event_id = outbox.add(app, "t", b"later", delay=HOUR)
                assert outbox.cancel(app, event_id) is True
        finally:
            admin.execute(f"DROP OWNED BY {role}")
            admin.execute(f"DROP ROLE {role}")
    assert [r[3] for r in events(database_url)] == [b"now"]
    assert scheduled(database_url) == []


# --- the release, and cancel's races with it ----------------------------------------------------


def test_release_due_moves_a_due_row_and_leaves_the_others(database_url: str) -> None:
    """A due row moves into the outbox unchanged, created_at = its due time; a row not yet due
    stays, a cancelled one never moves; next_due is the waiting row's due time."""
    past = dt.datetime.now(dt.UTC) - dt.timedelta(minutes=5)
    with psycopg.connect(database_url) as conn:
        due = outbox.add(
            conn, "orders", {"id": 1}, key="1", headers={"h": b"\x01"}, deliver_at=past
        )
        waiting = outbox.add(conn, "orders", b"later", deliver_at=LATER)
        cancelled = outbox.add(conn, "orders", b"never", deliver_at=past - HOUR)
    with psycopg.connect(database_url) as conn:
        assert outbox.cancel(conn, cancelled) is True
    assert release_due(database_url) == (1, LATER)
    assert events(database_url) == [(due, "orders", b"1", b'{"id":1}', ["h"], [b"\x01"], past)]
    assert [r[0] for r in scheduled(database_url)] == [waiting]
    assert release_due(database_url) == (0, LATER)
    with psycopg.connect(database_url) as conn:
        assert outbox.cancel(conn, due) is False  # released: too late to take it back


def test_the_release_skips_a_row_whose_cancel_is_open(database_url: str) -> None:
    """While the cancel's transaction is open the release passes the row by; the cancel rolled
    back, the next release moves it."""
    event_id = schedule_one(database_url, deliver_at=dt.datetime(2001, 1, 1, tzinfo=dt.UTC))
    with psycopg.connect(database_url) as canceller:
        assert outbox.cancel(canceller, event_id) is True
        assert release_due(database_url)[0] == 0
        canceller.rollback()
    assert release_due(database_url) == (1, None)
    assert [r[0] for r in events(database_url)] == [event_id]


def test_a_cancel_committed_before_the_release_wins(database_url: str) -> None:
    """Cancelled and committed first: the event never reaches the outbox."""
    event_id = schedule_one(database_url, delay=dt.timedelta(0))
    with psycopg.connect(database_url) as conn:
        assert outbox.cancel(conn, event_id) is True
    assert release_due(database_url) == (0, None)
    assert events(database_url) == []


# --- async --------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_async_twins_schedule_and_cancel(
    async_transaction: AsyncOpener, database_url: str
) -> None:
    """add_async and add_many_async schedule like their sync twins; cancel_async takes back."""
    async with async_transaction() as db:
        first = await outbox.add_async(db, "a", b"1", key="k", deliver_at=LATER)
        ids = await outbox.add_many_async(
            db, [Event("a", b"now"), Event("a", b"2", delay=HOUR), Event("a", b"3", delay=HOUR)]
        )
        assert await outbox.cancel_async(db, str(ids[2])) is True
        assert await outbox.cancel_async(db, ids[2]) is False
    rows = scheduled(database_url)
    assert [(r[0], r[3]) for r in rows] == [(first, b"1"), (ids[1], b"2")]
    assert rows[0][6] == LATER
    assert [r[0] for r in events(database_url)] == [ids[0]]


@pytest.mark.asyncio
async def test_async_rollback_leaves_nothing(
    async_transaction: AsyncOpener, database_url: str
) -> None:
    """An async transaction that rolls back stores no scheduled event, and cancels nothing."""
    kept = schedule_one(database_url)

    async def write_then_fail() -> None:
        async with async_transaction() as db:
            await outbox.add_async(db, "a", b"1", delay=HOUR)
            assert await outbox.cancel_async(db, kept) is True
            raise Boom

    with pytest.raises(Boom):
        await write_then_fail()
    assert [r[0] for r in scheduled(database_url)] == [kept]


@pytest.mark.asyncio
async def test_async_bad_schedule_is_refused_before_any_io(
    async_transaction: AsyncOpener, database_url: str, tmp_path: Path
) -> None:
    """The async entry points validate before sending, as the sync ones do."""
    async with async_transaction() as db:
        await outbox.add_async(db, "a", b"0")
        with traced(await async_pgconn_of(db), tmp_path / "async.trace") as sent:
            with pytest.raises(outbox.InvalidScheduleError, match="naive"):
                await outbox.add_async(db, "a", b"1", deliver_at=dt.datetime(2030, 1, 1))
            with pytest.raises(outbox.InvalidScheduleError, match="not both"):
                await outbox.add_many_async(db, [Event("a", b"2", deliver_at=LATER, delay=HOUR)])
            with pytest.raises(outbox.InvalidScheduleError, match="is not a UUID"):
                await outbox.cancel_async(db, "nope")
        assert sent == Counter()
        later = await outbox.add_async(db, "a", b"3", delay=HOUR)
    assert [r[0] for r in scheduled(database_url)] == [later]
