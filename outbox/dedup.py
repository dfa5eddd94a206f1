"""Consumer-side deduplication: record each processed message id with the side effects.

Delivery is at least once, so a consumer sees some messages twice. Call :func:`claim` inside the
transaction that applies a message's side effects: it records ``(consumer, message_id)`` and
returns True the first time, False when that consumer already processed the message. The record
commits or rolls back together with the side effects, so a side effect happens once.

    with Session(engine) as session, session.begin():
        if outbox.dedup.claim(session, "billing", event_id):
            session.add(Invoice(...))

Race-safe: two transactions claiming the same id at once serialise on the primary key; once both
finish exactly one got True (if the first rolls back, the second gets True).

Every function writes to the dedup table of ``settings`` when given, else of the settings
:func:`outbox.configure` set, so records live beside the events.
"""

from __future__ import annotations

import datetime as dt
import functools
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

import psycopg

from outbox.connections import execute, execute_async
from outbox.errors import InvalidEventError
from outbox.settings import OutboxSettings
from outbox.writer import default

if TYPE_CHECKING:
    from outbox.connections import AsyncDB, SyncDB

#: Longest consumer name and message id accepted, in UTF-8 bytes: they are primary-key columns,
#: and PostgreSQL refuses a btree entry over 2704 bytes (both columns together, uncompressed).
MAX_ID_LENGTH = 1024


_CLAIM = (
    "INSERT INTO {dedup} (consumer, message_id) VALUES (%s, %s) "
    "ON CONFLICT (consumer, message_id) DO NOTHING"
)
# Sorted ids take their index locks in one order, so two batches that overlap wait for each
# other instead of deadlocking. Only the ids already there come back (usually none), not every
# id claimed now.
_CLAIM_MANY = (
    "WITH ids AS (SELECT unnest(%s::text[]) AS id), "
    "claimed AS (INSERT INTO {dedup} (consumer, message_id) "
    "SELECT %s, id FROM ids ORDER BY id "
    "ON CONFLICT (consumer, message_id) DO NOTHING RETURNING message_id) "
    "SELECT id FROM ids EXCEPT ALL SELECT message_id FROM claimed"
)
_PURGE = (
    "DELETE FROM {dedup} AS d USING ("
    "SELECT consumer, message_id FROM {dedup} "
    "WHERE processed_at < now() - %s LIMIT %s) AS old "
    "WHERE d.consumer = old.consumer AND d.message_id = old.message_id"
)


@functools.lru_cache(maxsize=64)
def _statement(template: str, settings: OutboxSettings) -> str:
    """``template`` for the dedup table of ``settings``: built once per settings."""
    return settings.sql(template, dedup="dedup")


def _sql(template: str, settings: OutboxSettings | None) -> str:
    """``template`` for ``settings``, or for the configured settings when None."""
    return _statement(template, default().settings if settings is None else settings)


def _claim_sql(settings: OutboxSettings | None) -> str:
    return _sql(_CLAIM, settings)


def _valid(name: str, value: object) -> str:
    try:
        size = len(value.encode()) if isinstance(value, str) else 0
    except UnicodeEncodeError as exc:  # lone surrogates: not text PostgreSQL can store
        raise InvalidEventError(f"{name} is not valid Unicode text: {exc}") from None
    if not isinstance(value, str) or not value or size > MAX_ID_LENGTH:
        raise InvalidEventError(
            f"{name} must be a non-empty str of at most {MAX_ID_LENGTH} bytes in UTF-8, "
            f"got {value!r:.80}"
        )
    if "\x00" in value:
        raise InvalidEventError(f"{name} must not contain NUL characters")
    return value


def _check(consumer: object, message_id: object) -> tuple[str, str]:
    return _valid("consumer", consumer), _valid("message_id", message_id)


def claim(
    db: SyncDB, consumer: str, message_id: str, *, settings: OutboxSettings | None = None
) -> bool:
    """Record that ``consumer`` processed ``message_id``; False if it already had. Never commits."""
    return execute(db, _claim_sql(settings), _check(consumer, message_id)).rowcount == 1


async def claim_async(
    db: AsyncDB, consumer: str, message_id: str, *, settings: OutboxSettings | None = None
) -> bool:
    """The async twin of :func:`claim`."""
    executed = await execute_async(db, _claim_sql(settings), _check(consumer, message_id))
    return executed.rowcount == 1


def _claim_many_sql(settings: OutboxSettings | None) -> str:
    return _sql(_CLAIM_MANY, settings)


def text_array(values: Iterable[str]) -> str:
    """A text[] literal of ``values``, each quoted: psycopg adapts a list element by element in
    Python, which costs a batch consumer more than the statement that uses it."""
    return (
        "{"
        + ",".join('"' + v.replace("\\", "\\\\").replace('"', '\\"') + '"' for v in values)
        + "}"
    )


def _many(consumer: str, message_ids: Iterable[str]) -> tuple[set[str], tuple[str, str]]:
    """The distinct valid ids, and the statement's parameters."""
    ids = {_valid("message_id", message_id) for message_id in message_ids}
    return ids, (text_array(sorted(ids)), _valid("consumer", consumer))


def claim_many(
    db: SyncDB, consumer: str, message_ids: Iterable[str], *, settings: OutboxSettings | None = None
) -> set[str]:
    """:func:`claim` for many ids in one statement; returns the ids claimed now (the others
    were processed before). An id given twice is claimed once."""
    ids, params = _many(consumer, message_ids)
    if not ids:
        return set()
    return ids.difference(row[0] for row in execute(db, _claim_many_sql(settings), params).rows)


async def claim_many_async(
    db: AsyncDB,
    consumer: str,
    message_ids: Iterable[str],
    *,
    settings: OutboxSettings | None = None,
) -> set[str]:
    """The async twin of :func:`claim_many`."""
    ids, params = _many(consumer, message_ids)
    if not ids:
        return set()
    executed = await execute_async(db, _claim_many_sql(settings), params)
    return ids.difference(row[0] for row in executed.rows)


def purge(
    conn: psycopg.Connection[Any],
    older_than: dt.timedelta,
    *,
    settings: OutboxSettings | None = None,
    batch_size: int = 1000,
) -> int:
    """Delete dedup records older than ``older_than``, ``batch_size`` rows per transaction.

    Maintenance, not part of a business transaction: it commits after each batch, so locks stay
    short. Returns the number of rows deleted. Choose ``older_than`` longer than the longest
    time a message can be delivered again (see the README).
    """
    if older_than <= dt.timedelta(0):
        raise ValueError(f"older_than must be positive, got {older_than}")
    sql = _sql(_PURGE, settings)
    deleted = 0
    while True:
        with conn.transaction():
            count = conn.execute(sql, (older_than, batch_size)).rowcount
        deleted += count
        if count < batch_size:
            return deleted
