"""outbox.add_async / add_many_async on async connections, against a real PostgreSQL."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import outbox
from outbox.connections import AsyncDB
from outbox.envelope import Event
from tests.integration.connections import (
    ASYNC_KINDS,
    AsyncOpener,
    async_opener,
    async_pgconn_of,
    execute_async,
    round_trips,
    traced,
)

Row = tuple[uuid.UUID, str, bytes | None, bytes, list[str], list[bytes]]


async def stored(database_url: str) -> list[Row]:
    """The outbox rows as committed, in insertion (id) order."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT event_id, topic, key, payload, header_names, header_values "
            "FROM outbox_events ORDER BY id"
        )
        return await cursor.fetchall()


@pytest.fixture(params=ASYNC_KINDS)
def transaction(
    request: pytest.FixtureRequest, async_engine: AsyncEngine, database_url: str
) -> AsyncOpener:
    """Opens a transaction on one kind of async connection: commits on exit, rolls back on error."""
    return async_opener(request.param, async_engine, database_url)


class Boom(Exception):
    """Raised inside a transaction to make it roll back."""


@pytest.mark.asyncio
async def test_commit_stores_the_added_events_in_order(
    transaction: AsyncOpener, database_url: str
) -> None:
    """add_async and add_many_async store exactly their events, in order, under the returned ids."""
    async with transaction() as db:
        first = await outbox.add_async(db, "orders", {"id": 1}, key="o-1", headers={"h": "v"})
        rest = await outbox.add_many_async(
            db, [Event("payments", b"\x00\xff", key=b"\x01"), Event("orders", "text")]
        )
        last = await outbox.add_async(db, "orders", b"last")
    assert await stored(database_url) == [
        (first, "orders", b"o-1", b'{"id":1}', ["h"], [b"v"]),
        (rest[0], "payments", b"\x01", b"\x00\xff", [], []),
        (rest[1], "orders", None, b"text", [], []),
        (last, "orders", None, b"last", [], []),
    ]


@pytest.mark.asyncio
async def test_rollback_leaves_no_row(transaction: AsyncOpener, database_url: str) -> None:
    """Events added in an async transaction that rolls back are never stored."""

    async def write_then_fail() -> None:
        async with transaction() as db:
            await outbox.add_async(db, "orders", {"id": 1})
            await outbox.add_many_async(db, [Event("orders", {"id": 2})])
            raise Boom

    with pytest.raises(Boom):
        await write_then_fail()
    assert await stored(database_url) == []


@pytest.mark.asyncio
async def test_bad_event_keeps_the_transaction_usable(
    transaction: AsyncOpener, database_url: str, tmp_path: Path
) -> None:
    """A rejected event sends nothing; the business change and a good event still commit."""
    async with await psycopg.AsyncConnection.connect(database_url, autocommit=True) as conn:
        await conn.execute("CREATE TABLE orders (id integer PRIMARY KEY)")
    async with transaction() as db:
        await execute_async(db, "INSERT INTO orders (id) VALUES (7)")
        with traced(await async_pgconn_of(db), tmp_path / "bad.trace") as sent:
            with pytest.raises(outbox.InvalidHeaderError, match="reserved"):
                await outbox.add_async(db, "orders", {}, headers={"event_id": "x"})
            with pytest.raises(outbox.InvalidTopicError):
                await outbox.add_many_async(db, [Event("orders", {}), Event("", {})])
        assert sent == Counter()
        good = await outbox.add_async(db, "orders", {"id": 7})
    assert [r[0] for r in await stored(database_url)] == [good]
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute("SELECT id FROM orders")
        assert await cursor.fetchall() == [(7,)]


@pytest.mark.asyncio
async def test_add_many_async_is_one_round_trip(
    transaction: AsyncOpener, database_url: str, tmp_path: Path
) -> None:
    """1,000 events take one round trip, where three add_async calls take three."""
    async with transaction() as db:
        await execute_async(db, "SELECT 1")  # the transaction is open before we start counting
        pgconn = await async_pgconn_of(db)
        with traced(pgconn, tmp_path / "many.trace") as many:
            ids = await outbox.add_many_async(db, [Event("bulk", {"n": n}) for n in range(1000)])
        with traced(pgconn, tmp_path / "adds.trace") as adds:
            ids += [await outbox.add_async(db, "bulk", {"n": n}) for n in range(3)]
    assert (round_trips(many), many["Execute"]) == (1, 1)
    assert (round_trips(adds), adds["Execute"]) == (3, 3)
    assert [r[0] for r in await stored(database_url)] == ids


@pytest.mark.asyncio
async def test_add_many_async_of_nothing_writes_nothing(database_url: str) -> None:
    """An empty add_many_async returns no ids and stores nothing."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        assert await outbox.add_many_async(conn, []) == []
    assert await stored(database_url) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["psycopg-async", "sa-async-connection", "async-session"])
async def test_autocommit_without_transaction_is_refused(
    kind: str, async_engine: AsyncEngine, database_url: str
) -> None:
    """An async connection that would commit the event on its own raises and writes nothing."""
    autocommit_engine = async_engine.execution_options(isolation_level="AUTOCOMMIT")
    async with contextlib.AsyncExitStack() as stack:
        if kind == "psycopg-async":
            connect = psycopg.AsyncConnection.connect(database_url, autocommit=True)
            db: AsyncDB = await stack.enter_async_context(await connect)
        elif kind == "sa-async-connection":
            db = await stack.enter_async_context(autocommit_engine.begin())
        else:
            db = await stack.enter_async_context(AsyncSession(autocommit_engine))
            await stack.enter_async_context(db.begin())
        with pytest.raises(outbox.TransactionRequiredError, match="autocommit mode"):
            await outbox.add_async(db, "orders", {"id": 1})
        with pytest.raises(outbox.TransactionRequiredError, match="open a transaction first"):
            await outbox.add_many_async(db, [Event("orders", {"id": 2})])
    assert await stored(database_url) == []


@pytest.mark.asyncio
@pytest.mark.parametrize("kind", ["psycopg", "orm-session", "sa-connection"])
async def test_sync_connection_is_refused(kind: str, engine: sa.Engine, database_url: str) -> None:
    """A sync connection passed to add_async raises UnsupportedConnectionError pointing to add()."""
    with contextlib.ExitStack() as stack:
        if kind == "psycopg":
            db: Any = stack.enter_context(psycopg.connect(database_url))
        elif kind == "orm-session":
            db = stack.enter_context(Session(engine))
        else:
            db = stack.enter_context(engine.connect())
        message = r" is a SQLAlchemy Session or Connection, .*: use the add\(\) variant"
        with pytest.raises(outbox.UnsupportedConnectionError, match=message):
            await outbox.add_async(db, "orders", {})
        with pytest.raises(outbox.UnsupportedConnectionError, match=message):
            await outbox.add_many_async(db, [Event("orders", {})])
    assert await stored(database_url) == []


@pytest.mark.asyncio
async def test_non_connection_is_refused() -> None:
    """Something that is no connection at all gets a message listing the accepted types."""
    with pytest.raises(outbox.UnsupportedConnectionError, match=r"db must be .* got str"):
        await outbox.add_async("postgresql://localhost/db", "orders", {})  # type: ignore[arg-type]


@pytest.mark.asyncio
async def test_missing_schema_raises_schema_missing_error(empty_database_url: str) -> None:
    """Writing to a database without the outbox tables says to run `outbox-relay schema apply`."""
    async with await psycopg.AsyncConnection.connect(empty_database_url) as conn:
        with pytest.raises(outbox.SchemaMissingError, match="outbox-relay schema apply"):
            await outbox.add_async(conn, "orders", {})
        await conn.rollback()
