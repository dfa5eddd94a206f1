"""Run one statement on whatever connection the caller holds, inside the caller's transaction.

The writer and the dedup helper accept a SQLAlchemy ``Session``/``Connection``, a psycopg 3
``Connection`` (and their async twins), or a Django database connection on the psycopg 3
backend (``django.db.connection``). This module is the only place that knows those types.
It never commits, never opens a connection, and refuses a connection that is in autocommit mode
with no transaction open, because a row written there would escape the caller's transaction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Protocol, TypeAlias, TypeGuard

import psycopg
import sqlalchemy.exc
from psycopg.pq import TransactionStatus
from sqlalchemy.engine import Connection as SAConnection
from sqlalchemy.orm import Session, scoped_session

from outbox.errors import (
    SchemaMissingError,
    TransactionRequiredError,
    UnsupportedConnectionError,
)

if TYPE_CHECKING:
    # SQLAlchemy's asyncio extension needs greenlet; it is imported only when an async call is
    # made, so sync-only applications don't need it installed.
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session


class DjangoConnection(Protocol):
    """What the library uses of Django's ``BaseDatabaseWrapper`` (``django.db.connection``),
    described here so that the library never imports Django."""

    vendor: str
    connection: Any

    def ensure_connection(self) -> None: ...

    def cursor(self) -> Any: ...


SyncDB: TypeAlias = (
    "Session | scoped_session[Any] | SAConnection | psycopg.Connection[Any] | DjangoConnection"
)
AsyncDB: TypeAlias = (
    "AsyncSession | async_scoped_session[Any] | SAAsyncConnection | psycopg.AsyncConnection[Any]"
)
Params = Sequence[object]

_SYNC_NAMES = (
    "a SQLAlchemy Session or Connection, a psycopg Connection, or a Django database connection"
)
_ASYNC_NAMES = "a SQLAlchemy AsyncSession or AsyncConnection, or a psycopg AsyncConnection"


@dataclass(frozen=True, slots=True)
class Executed:
    """What a statement did: rows affected, and the rows it returned (RETURNING), if any."""

    rowcount: int
    rows: list[tuple[Any, ...]]


def execute(db: SyncDB, sql: str, params: Params) -> Executed:
    """Execute ``sql`` on ``db`` in its current transaction (starting one if it has none)."""
    try:
        if isinstance(db, psycopg.Connection):
            require_transaction(db)
            cursor = db.execute(sql, params)
            return Executed(cursor.rowcount, cursor.fetchall() if cursor.description else [])
        if _is_django(db):
            return _django_execute(db, sql, params)
        conn = _sa_connection(db)
        require_transaction(_psycopg_of(conn.connection.driver_connection, conn))
        result = conn.exec_driver_sql(sql, tuple(params))
        return Executed(result.rowcount, _sa_rows(result))
    except (psycopg.Error, sqlalchemy.exc.DBAPIError) as exc:
        raise translate(exc) from exc


async def execute_async(db: AsyncDB, sql: str, params: Params) -> Executed:
    """The async twin of :func:`execute`."""
    try:
        if isinstance(db, psycopg.AsyncConnection):
            require_transaction(db)
            cursor = await db.execute(sql, params)
            return Executed(cursor.rowcount, await cursor.fetchall() if cursor.description else [])
        conn = await _sa_async_connection(db)
        raw = await conn.get_raw_connection()
        require_transaction(_psycopg_of(raw.driver_connection, conn))
        result = await conn.exec_driver_sql(sql, tuple(params))
        return Executed(result.rowcount, _sa_rows(result))
    except (psycopg.Error, sqlalchemy.exc.DBAPIError) as exc:
        raise translate(exc) from exc


def _is_django(db: object) -> TypeGuard[DjangoConnection]:
    """A Django database connection: ``connections[alias]``, or ``django.db.connection`` (a
    proxy of the default one, which forwards every attribute)."""
    module = type(db).__module__
    return (
        module.startswith("django.db.backends.") or module == "django.utils.connection"
    ) and hasattr(db, "ensure_connection")


def _django_execute(db: DjangoConnection, sql: str, params: Params) -> Executed:
    """Through Django's own cursor, so its transaction bookkeeping (a broken ``atomic`` block
    refuses further statements), query logging and execute wrappers all see the statement."""
    db.ensure_connection()
    raw = db.connection
    if not isinstance(raw, psycopg.Connection):
        raise UnsupportedConnectionError(
            f"outbox needs Django's PostgreSQL backend on psycopg 3 (Django 4.2+ with psycopg "
            f"installed); this connection is {db.vendor!r} on {type(raw).__module__!r}"
        )
    require_transaction(raw)
    try:
        with db.cursor() as cursor:
            cursor.execute(sql, params)
            rows = [tuple(r) for r in cursor.fetchall()] if cursor.description else []
            return Executed(cursor.rowcount, rows)
    except Exception as exc:
        # Django wraps the driver's errors in its own (django.db.utils); the cause is psycopg's.
        cause = exc.__cause__
        translated = translate(cause) if isinstance(cause, psycopg.Error) else exc
        if translated is cause:
            raise
        raise translated from exc


def _sa_rows(result: sqlalchemy.CursorResult[Any]) -> list[tuple[Any, ...]]:
    return [tuple(row) for row in result.fetchall()] if result.returns_rows else []


def require_transaction(conn: psycopg.Connection[Any] | psycopg.AsyncConnection[Any]) -> None:
    """Refuse a connection whose next statement would commit on its own."""
    if conn.autocommit and conn.info.transaction_status == TransactionStatus.IDLE:
        raise TransactionRequiredError(
            "the connection is in autocommit mode and no transaction is open, so the event would "
            "be committed on its own, apart from your business change; open a transaction first "
            "(psycopg: `with conn.transaction():`, SQLAlchemy: `with conn.begin():` without "
            "isolation_level='AUTOCOMMIT')"
        )


def _sa_connection(db: object) -> SAConnection:
    if isinstance(db, scoped_session):
        db = db()
    if isinstance(db, Session):
        return db.connection()
    if isinstance(db, SAConnection):
        return db
    raise _unsupported(db, expected=_SYNC_NAMES, other=_ASYNC_NAMES, other_call="add_async")


async def _sa_async_connection(db: object) -> SAAsyncConnection:
    from sqlalchemy.ext.asyncio import AsyncConnection as SAAsyncConnection
    from sqlalchemy.ext.asyncio import AsyncSession, async_scoped_session

    if _is_django(db):
        raise UnsupportedConnectionError(
            "Django's database connections are synchronous, and its transactions (atomic) "
            "cannot span awaits: in async code, run the transaction in a function wrapped by "
            "asgiref's sync_to_async and call the sync variant (outbox.add, dedup.claim) in it"
        )

    if isinstance(db, async_scoped_session):
        db = db()
    if isinstance(db, AsyncSession):
        return await db.connection()
    if isinstance(db, SAAsyncConnection):
        return db
    raise _unsupported(db, expected=_ASYNC_NAMES, other=_SYNC_NAMES, other_call="add")


def _unsupported(db: object, *, expected: str, other: str, other_call: str) -> Exception:
    kind = type(db).__name__
    if _is_async(db) == (other_call == "add_async"):
        return UnsupportedConnectionError(
            f"{kind} is {other}: use the {other_call}() variant of this call"
        )
    return UnsupportedConnectionError(f"db must be {expected}, got {kind}")


def _is_async(db: object) -> bool | None:
    """True for an async connection type, False for a sync one, None for anything else."""
    if isinstance(db, psycopg.AsyncConnection) or type(db).__module__.startswith(
        "sqlalchemy.ext.asyncio"
    ):
        return True
    if isinstance(db, psycopg.Connection | Session | SAConnection | scoped_session) or _is_django(
        db
    ):
        return False
    return None


def _psycopg_of(
    driver_connection: object, conn: SAConnection | SAAsyncConnection
) -> psycopg.Connection[Any] | psycopg.AsyncConnection[Any]:
    if isinstance(driver_connection, psycopg.Connection | psycopg.AsyncConnection):
        return driver_connection
    raise UnsupportedConnectionError(
        f"outbox needs the psycopg 3 driver; this engine uses {conn.dialect.driver!r}: "
        "use a URL starting with postgresql+psycopg://"
    )


def translate(exc: psycopg.Error | sqlalchemy.exc.DBAPIError) -> Exception:
    """Turn driver errors that have a known cause into the library's own errors."""
    orig = exc.orig if isinstance(exc, sqlalchemy.exc.DBAPIError) else exc
    if isinstance(orig, psycopg.errors.UndefinedTable):
        return SchemaMissingError(
            f"{orig.diag.message_primary}: the outbox schema is not installed in this database "
            "(run `outbox-relay schema apply`); the current transaction is aborted"
        )
    return exc
