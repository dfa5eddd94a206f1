"""outbox.add_async / add_many_async on async connections, against a real PostgreSQL."""

from __future__ import annotations

import contextlib
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

import outbox
from outbox.connections import AsyncDB
from outbox.envelope import Event

Row = tuple[uuid.UUID, str, bytes | None, bytes, list[str], list[bytes]]
AsyncOpener = Callable[[], contextlib.AbstractAsyncContextManager[Any]]

TRANSACTIONS = [
    "async-session",
    "sa-async-connection",
    "psycopg-async",
    "psycopg-async-autocommit-in-transaction",
]


async def stored(database_url: str) -> list[Row]:
    """The outbox rows as committed, in insertion (id) order."""
    async with await psycopg.AsyncConnection.connect(database_url) as conn:
        cursor = await conn.execute(
            "SELECT event_id, topic, key, payload, header_names, header_values "
            "FROM outbox_events ORDER BY id"
        )
        return await cursor.fetchall()


async def run(db: AsyncDB, sql: str) -> None:
    """Run a business statement on whichever async connection type ``db`` is."""
    if isinstance(db, psycopg.AsyncConnection):
        await db.execute(sql)
    elif isinstance(db, AsyncSession):
        await db.execute(sa.text(sql))
    else:
        assert isinstance(db, AsyncConnection)
        await db.exec_driver_sql(sql)


async def pgconn_of(db: AsyncDB) -> psycopg.pq.abc.PGconn:
    """The libpq connection underneath ``db``."""
    if isinstance(db, psycopg.AsyncConnection):
        return db.pgconn
    conn = await db.connection() if isinstance(db, AsyncSession) else db
    assert isinstance(conn, AsyncConnection)
    driver = (await conn.get_raw_connection()).driver_connection
    assert isinstance(driver, psycopg.AsyncConnection)
    return driver.pgconn


@contextlib.contextmanager
def traced(pgconn: psycopg.pq.abc.PGconn, path: Path) -> Iterator[Counter[str]]:
    """Count the protocol messages the client sends inside the block, by message type."""
    sent: Counter[str] = Counter()
    with path.open("wb") as trace:
        pgconn.trace(trace.fileno())
        pgconn.set_trace_flags(psycopg.pq.Trace.SUPPRESS_TIMESTAMPS | psycopg.pq.Trace.REGRESS_MODE)
        try:
            yield sent
        finally:
            pgconn.untrace()  # flushes the trace
    for line in path.read_text(errors="replace").splitlines():
        direction, _length, message, *_ = [*line.split("\t"), "", ""]
        if direction == "F":
            sent[message.strip()] += 1


def round_trips(sent: Counter[str]) -> int:
    """Each Sync (extended protocol) or Query (simple protocol) waits for the server once."""
    return sent["Sync"] + sent["Query"]


@pytest.fixture(params=TRANSACTIONS)
def transaction(
    request: pytest.FixtureRequest, async_engine: AsyncEngine, database_url: str
) -> AsyncOpener:
    """Opens a transaction on one kind of async connection: commits on exit, rolls back on error."""
    kind = request.param

    @contextlib.asynccontextmanager
    async def open_transaction() -> AsyncIterator[AsyncDB]:
        if kind == "async-session":
            async with AsyncSession(async_engine) as session, session.begin():
                yield session
        elif kind == "sa-async-connection":
            async with async_engine.begin() as conn:
                yield conn
        elif kind == "psycopg-async":
            async with await psycopg.AsyncConnection.connect(database_url) as pg:
                assert not pg.autocommit
                yield pg
        else:
            connect = psycopg.AsyncConnection.connect(database_url, autocommit=True)
            async with await connect as pg, pg.transaction():
                yield pg

    return open_transaction


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
        await run(db, "INSERT INTO orders (id) VALUES (7)")
        with traced(await pgconn_of(db), tmp_path / "bad.trace") as sent:
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
        await run(db, "SELECT 1")  # the transaction is open before we start counting
        pgconn = await pgconn_of(db)
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
