"""outbox.add / add_many on sync connections, against a real PostgreSQL."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncSession, create_async_engine
from sqlalchemy.orm import Session

import outbox
from outbox import migrator, urls
from outbox.connections import SyncDB
from outbox.envelope import Event
from outbox.settings import DEFAULT_MAX_PAYLOAD_BYTES, OutboxSettings
from tests.integration.connections import (
    SYNC_KINDS,
    Opener,
    execute,
    pgconn_of,
    round_trips,
    sync_opener,
    traced,
)

Row = tuple[uuid.UUID, str, bytes | None, bytes, list[str], list[bytes]]

DEFAULT_TABLE = OutboxSettings().events_table


def stored(database_url: str, table: str = DEFAULT_TABLE) -> list[Row]:
    """The outbox rows as committed, in insertion (id) order."""
    with psycopg.connect(database_url) as conn:
        return conn.execute(
            "SELECT event_id, topic, key, payload, header_names, header_values "
            f"FROM {table} ORDER BY id"
        ).fetchall()


def row(
    event_id: uuid.UUID,
    topic: str,
    payload: bytes,
    key: bytes | None = None,
    headers: dict[str, bytes] | None = None,
) -> Row:
    """The row we expect for one event."""
    headers = headers or {}
    return (event_id, topic, key, payload, list(headers), list(headers.values()))


@pytest.fixture(params=SYNC_KINDS)
def transaction(request: pytest.FixtureRequest, engine: sa.Engine, database_url: str) -> Opener:
    """Opens a transaction on one kind of sync connection: commits on exit, rolls back on error."""
    return sync_opener(request.param, engine, database_url)


@pytest.fixture
def orders(database_url: str) -> Callable[[], list[int]]:
    """Creates a business table ``orders``; returns a function reading its committed ids."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("CREATE TABLE orders (id integer PRIMARY KEY)")

    def committed() -> list[int]:
        with psycopg.connect(database_url) as conn:
            return [r[0] for r in conn.execute("SELECT id FROM orders ORDER BY id")]

    return committed


class Boom(Exception):
    """Raised inside a transaction to make it roll back."""


# --- atomicity and connection types -------------------------------------------------------------


def test_rollback_leaves_no_row(transaction: Opener, database_url: str) -> None:
    """Events added in a transaction that rolls back are never stored."""

    def write_then_fail() -> None:
        with transaction() as db:
            outbox.add(db, "orders", {"id": 1})
            outbox.add_many(db, [Event("orders", {"id": 2}), Event("orders", {"id": 3})])
            raise Boom

    with pytest.raises(Boom):
        write_then_fail()
    assert stored(database_url) == []


def test_commit_stores_exactly_the_added_events_in_order(
    transaction: Opener, database_url: str
) -> None:
    """After commit the table holds exactly the events added, in order, under the ids returned."""
    with transaction() as db:
        first = outbox.add(db, "orders.created", {"id": 1, "total": "9.90"}, key="order-1")
        second = outbox.add(db, "payments", b"\x00\xff", key=b"\x01", headers={"h": "v"})
        third = outbox.add(
            db, "orders.created", "plain text", headers={"b": b"\x00", "a": "\u00e9"}
        )
    assert all(isinstance(i, uuid.UUID) and i.version == 7 for i in (first, second, third))
    assert stored(database_url) == [
        row(first, "orders.created", b'{"id":1,"total":"9.90"}', b"order-1"),
        row(second, "payments", b"\x00\xff", b"\x01", {"h": b"v"}),
        row(third, "orders.created", b"plain text", None, {"b": b"\x00", "a": b"\xc3\xa9"}),
    ]


AUTOCOMMIT = ["psycopg", "sa-connection", "sa-engine-begin", "orm-session"]


@pytest.mark.parametrize("kind", AUTOCOMMIT)
def test_autocommit_without_transaction_is_refused(
    kind: str, engine: sa.Engine, database_url: str
) -> None:
    """A connection that would commit the event on its own raises and writes nothing."""
    autocommit_engine = engine.execution_options(isolation_level="AUTOCOMMIT")
    with contextlib.ExitStack() as stack:
        if kind == "psycopg":
            db: SyncDB = stack.enter_context(psycopg.connect(database_url, autocommit=True))
        elif kind == "sa-connection":
            db = stack.enter_context(engine.connect())
            db.execution_options(isolation_level="AUTOCOMMIT")
        elif kind == "sa-engine-begin":
            db = stack.enter_context(autocommit_engine.begin())
        else:
            db = stack.enter_context(Session(autocommit_engine))
            stack.enter_context(db.begin())
        with pytest.raises(outbox.TransactionRequiredError, match="autocommit mode"):
            outbox.add(db, "orders", {"id": 1})
        with pytest.raises(outbox.TransactionRequiredError, match="open a transaction first"):
            outbox.add_many(db, [Event("orders", {"id": 2})])
    assert stored(database_url) == []


# --- bad input ----------------------------------------------------------------------------------

BAD_EVENTS = [
    pytest.param({"topic": "no spaces"}, outbox.InvalidTopicError, id="bad-topic"),
    pytest.param(
        {"payload": b"x" * (DEFAULT_MAX_PAYLOAD_BYTES + 1)},
        outbox.PayloadTooLargeError,
        id="payload-too-large",
    ),
    pytest.param({"payload": object()}, outbox.PayloadSerializationError, id="unserializable"),
    pytest.param({"key": 42}, outbox.InvalidKeyError, id="bad-key"),
    pytest.param({"headers": {"h": 1}}, outbox.InvalidHeaderError, id="bad-header"),
    pytest.param({"headers": {"event_id": "x"}}, outbox.InvalidHeaderError, id="reserved-header"),
]


@pytest.mark.parametrize(("bad", "error"), BAD_EVENTS)
def test_bad_event_raises_before_writing_and_the_transaction_stays_usable(
    transaction: Opener,
    orders: Callable[[], list[int]],
    database_url: str,
    tmp_path: Path,
    bad: dict[str, Any],
    error: type[Exception],
) -> None:
    """A rejected event sends nothing to the server; the business change and a good event commit."""
    event = {"topic": "orders", "payload": {"id": 1}, **bad}
    with transaction() as db:
        execute(db, "INSERT INTO orders (id) VALUES (1)")
        with traced(pgconn_of(db), tmp_path / "add.trace") as sent, pytest.raises(error):
            outbox.add(db, **event)
        assert sent == Counter()
        with traced(pgconn_of(db), tmp_path / "add_many.trace") as sent, pytest.raises(error):
            outbox.add_many(db, [Event("orders", {"id": 0}), Event(**event)])
        assert sent == Counter()
        good = outbox.add(db, "orders", {"id": 1})
    assert orders() == [1]
    assert stored(database_url) == [row(good, "orders", b'{"id":1}')]


# --- add_many -----------------------------------------------------------------------------------


def test_add_many_writes_events_in_order_and_returns_their_ids(
    transaction: Opener, database_url: str
) -> None:
    """add_many stores every event in the given order and returns their ids in that order."""
    events = [
        Event("a", {"n": 1}),
        Event("b", b"two", key="k2", headers={"x": b"1"}),
        Event("a", "three", key=b"k3"),
    ]
    with transaction() as db:
        ids = outbox.add_many(db, iter(events))
    assert stored(database_url) == [
        row(ids[0], "a", b'{"n":1}'),
        row(ids[1], "b", b"two", b"k2", {"x": b"1"}),
        row(ids[2], "a", b"three", b"k3"),
    ]
    assert len(set(ids)) == 3


def test_add_many_of_nothing_writes_nothing(database_url: str, tmp_path: Path) -> None:
    """An empty add_many returns no ids, sends nothing and stores nothing."""
    with psycopg.connect(database_url) as conn:
        with traced(pgconn_of(conn), tmp_path / "empty.trace") as sent:
            assert outbox.add_many(conn, []) == []
        assert sent == Counter()
    assert stored(database_url) == []


def test_add_many_of_1000_events_is_one_round_trip(
    transaction: Opener, database_url: str, tmp_path: Path
) -> None:
    """1,000 events take one round trip (libpq protocol trace), where three add calls take three."""
    events = [Event("bulk", {"n": n}, key=f"k{n % 7}") for n in range(1000)]
    with transaction() as db:
        execute(db, "SELECT 1")  # the transaction is open before we start counting
        with traced(pgconn_of(db), tmp_path / "many.trace") as many:
            ids = outbox.add_many(db, events)
        with traced(pgconn_of(db), tmp_path / "adds.trace") as adds:
            ids += [outbox.add(db, "bulk", {"n": n}) for n in range(3)]
    assert (round_trips(many), many["Execute"]) == (1, 1)
    assert (round_trips(adds), adds["Execute"]) == (3, 3)  # so the count above can fail
    assert [r[0] for r in stored(database_url)] == ids


def test_add_many_of_12000_events_uses_three_statements(database_url: str, tmp_path: Path) -> None:
    """12,000 events take three INSERTs of at most 5,000 rows, and all are stored in order."""
    events = [Event("bulk", str(n)) for n in range(12_000)]
    with psycopg.connect(database_url) as conn:
        conn.execute("SELECT 1")
        with traced(pgconn_of(conn), tmp_path / "big.trace") as sent:
            ids = outbox.add_many(conn, events)
    assert (round_trips(sent), sent["Execute"]) == (3, 3)
    rows = stored(database_url)
    assert [r[0] for r in rows] == ids
    assert [r[3] for r in rows] == [str(n).encode() for n in range(12_000)]


# --- shards -------------------------------------------------------------------------------------


def shards(database_url: str) -> list[tuple[bytes | None, int]]:
    with psycopg.connect(database_url) as conn:
        return conn.execute("SELECT key, shard FROM outbox_events ORDER BY id").fetchall()


def test_rows_with_one_key_share_a_shard(database_url: str) -> None:
    """Every row with a given key lands in the same shard, whatever the key's type."""
    keys = [f"customer-{n}" for n in range(40)]
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [Event("t", {}, key=k) for k in keys * 3])
        outbox.add_many(conn, [Event("t", {}, key=k.encode()) for k in keys])
    by_key: dict[bytes | None, set[int]] = {}
    for key, shard in shards(database_url):
        by_key.setdefault(key, set()).add(shard)
    assert len(by_key) == 40
    assert all(len(found) == 1 for found in by_key.values())
    assert len(set().union(*by_key.values())) > 1  # distinct keys spread too


def test_rows_without_a_key_spread_over_shards(database_url: str) -> None:
    """Keyless rows are not all put in one shard, and every shard is in [0, SHARD_COUNT)."""
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [Event("t", {}) for _ in range(600)])
        outbox.add_many(conn, [Event("t", {}, key=str(n)) for n in range(600)])
    found = shards(database_url)
    assert len({shard for key, shard in found if key is None}) > 1
    assert all(0 <= shard < outbox.SHARD_COUNT for _, shard in found)


# --- schema, connection types, settings ---------------------------------------------------------


@pytest.mark.parametrize("kind", ["psycopg", "orm-session"])
def test_missing_schema_raises_schema_missing_error(kind: str, empty_database_url: str) -> None:
    """Writing to a database without the outbox tables says to run `outbox-relay schema apply`."""
    engine = sa.create_engine(urls.to_sqlalchemy(empty_database_url))
    with contextlib.ExitStack() as stack:
        stack.callback(engine.dispose)
        opened = psycopg.connect(empty_database_url) if kind == "psycopg" else Session(engine)
        db: Any = stack.enter_context(opened)
        with pytest.raises(outbox.SchemaMissingError, match="outbox-relay schema apply"):
            outbox.add(db, "orders", {})
        db.rollback()
        with pytest.raises(outbox.SchemaMissingError, match="the current transaction is aborted"):
            outbox.add_many(db, [Event("orders", {})])
        db.rollback()


@pytest.mark.parametrize(
    ("make", "message"),
    [
        pytest.param(lambda url: url, "db must be a SQLAlchemy Session or .* got str", id="str"),
        pytest.param(sa.create_engine, "db must be .* got Engine", id="sa-engine"),
        pytest.param(
            lambda url: AsyncSession(create_async_engine(url)),
            r"AsyncSession is a SQLAlchemy AsyncSession.*: use the add_async\(\) variant",
            id="async-session",
        ),
        pytest.param(
            lambda url: create_async_engine(url).connect(),
            r"AsyncConnection is .*: use the add_async\(\) variant",
            id="async-connection",
        ),
    ],
)
def test_unsupported_connection_is_refused(
    make: Callable[[str], Any], message: str, database_url: str
) -> None:
    """Objects that are not sync connections raise UnsupportedConnectionError saying what to use."""
    db = make(urls.to_sqlalchemy(database_url))
    with pytest.raises(outbox.UnsupportedConnectionError, match=message):
        outbox.add(db, "orders", {})
    with pytest.raises(outbox.UnsupportedConnectionError, match=message):
        outbox.add_many(db, [Event("orders", {})])
    with pytest.raises(TypeError):  # generic handlers still catch it
        outbox.add(db, "orders", {})
    assert stored(database_url) == []


def test_custom_settings_write_into_their_own_table(database_url: str) -> None:
    """An Outbox with its own schema and table prefix writes there and nowhere else."""
    settings = OutboxSettings(schema="billing", table_prefix="evt_", max_payload_bytes=8)
    with psycopg.connect(database_url) as conn:
        migrator.apply(conn, settings)
    writer = outbox.Outbox(settings)
    with psycopg.connect(database_url) as conn:
        first = writer.add(conn, "invoices", b"12345678", key="i-1")
        rest = writer.add_many(conn, [Event("invoices", "x"), Event("credits", b"y")])
        with pytest.raises(outbox.PayloadTooLargeError):
            writer.add(conn, "invoices", b"123456789")
    assert stored(database_url, '"billing"."evt_events"') == [
        row(first, "invoices", b"12345678", b"i-1"),
        row(rest[0], "invoices", b"x"),
        row(rest[1], "credits", b"y"),
    ]
    assert stored(database_url) == []


def test_serializer_of_the_writer_and_of_the_call(database_url: str) -> None:
    """Outbox(serializer=...) encodes payloads, and a serializer passed to a call overrides it."""
    writer = outbox.Outbox(serializer=lambda value: b"writer:" + repr(value).encode())
    with psycopg.connect(database_url) as conn:
        first = writer.add(conn, "t", {"a": 1})
        second = writer.add(conn, "t", {"a": 2}, serializer=lambda value: b"call")
        (third,) = writer.add_many(conn, [Event("t", 3)], serializer=lambda value: b"many")
    assert [r[:4] for r in stored(database_url)] == [
        (first, "t", None, b"writer:{'a': 1}"),
        (second, "t", None, b"call"),
        (third, "t", None, b"many"),
    ]
