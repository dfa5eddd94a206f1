"""Every kind of connection the writer and the dedup claim accept, opened the same way in each
test, and libpq's trace to count what a call sends to the server."""

from __future__ import annotations

import contextlib
from collections import Counter
from collections.abc import AsyncIterator, Callable, Iterator
from pathlib import Path
from typing import Any

import psycopg
import sqlalchemy as sa
from sqlalchemy.engine import Connection
from sqlalchemy.ext.asyncio import AsyncConnection, AsyncEngine, AsyncSession
from sqlalchemy.orm import Session

from outbox.connections import AsyncDB, SyncDB

Opener = Callable[[], contextlib.AbstractContextManager[Any]]
AsyncOpener = Callable[[], contextlib.AbstractAsyncContextManager[Any]]

#: The sync connections, each inside a transaction the caller opened.
SYNC_KINDS = ["orm-session", "sa-connection", "psycopg", "psycopg-autocommit-in-transaction"]
#: The async ones.
ASYNC_KINDS = [
    "async-session",
    "sa-async-connection",
    "psycopg-async",
    "psycopg-async-autocommit-in-transaction",
]


def sync_opener(kind: str, engine: sa.Engine, database_url: str) -> Opener:
    """Opens a transaction on one kind of sync connection: commits on exit, rolls back on error."""

    @contextlib.contextmanager
    def open_transaction() -> Iterator[SyncDB]:
        if kind == "orm-session":
            with Session(engine) as session, session.begin():
                yield session
        elif kind == "sa-connection":
            with engine.begin() as conn:
                yield conn
        elif kind == "psycopg":
            with psycopg.connect(database_url) as pg:
                assert not pg.autocommit
                yield pg
        else:
            with psycopg.connect(database_url, autocommit=True) as pg, pg.transaction():
                yield pg

    return open_transaction


def async_opener(kind: str, engine: AsyncEngine, database_url: str) -> AsyncOpener:
    """Opens a transaction on one kind of async connection: commits on exit, rolls back on
    error."""

    @contextlib.asynccontextmanager
    async def open_transaction() -> AsyncIterator[AsyncDB]:
        if kind == "async-session":
            async with AsyncSession(engine) as session, session.begin():
                yield session
        elif kind == "sa-async-connection":
            async with engine.begin() as conn:
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


def execute(db: SyncDB, sql: str) -> None:
    """Run a business statement on whichever sync connection type ``db`` is."""
    if isinstance(db, psycopg.Connection):
        db.execute(sql)
    elif isinstance(db, Session):
        db.execute(sa.text(sql))
    else:
        assert isinstance(db, Connection)
        db.exec_driver_sql(sql)


async def execute_async(db: AsyncDB, sql: str) -> None:
    """Run a business statement on whichever async connection type ``db`` is."""
    if isinstance(db, psycopg.AsyncConnection):
        await db.execute(sql)
    elif isinstance(db, AsyncSession):
        await db.execute(sa.text(sql))
    else:
        assert isinstance(db, AsyncConnection)
        await db.exec_driver_sql(sql)


def pgconn_of(db: SyncDB) -> psycopg.pq.abc.PGconn:
    """The libpq connection underneath ``db``."""
    if isinstance(db, psycopg.Connection):
        return db.pgconn
    conn = db.connection() if isinstance(db, Session) else db
    assert isinstance(conn, Connection)
    driver = conn.connection.driver_connection
    assert isinstance(driver, psycopg.Connection)
    return driver.pgconn


async def async_pgconn_of(db: AsyncDB) -> psycopg.pq.abc.PGconn:
    """The libpq connection underneath the async ``db``."""
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
