"""outbox: write events into the transactional outbox, inside your own transaction.

    import outbox

    with Session(engine) as session, session.begin():
        session.add(order)
        outbox.add(session, "orders", {"id": order.id}, key=str(order.id))

The event is committed if and only if your transaction commits. A separate relay
(``outbox-relay run``) publishes it to Kafka.
"""

from __future__ import annotations

import datetime as dt
import uuid
from collections.abc import Iterable
from typing import TYPE_CHECKING, Any

from outbox import dedup
from outbox.envelope import (
    EVENT_ID_HEADER,
    Envelope,
    Event,
    Headers,
    Key,
    Serializer,
    json_serializer,
)
from outbox.errors import (
    ConfigurationError,
    InvalidEventError,
    InvalidHeaderError,
    InvalidIdentifierError,
    InvalidKeyError,
    InvalidScheduleError,
    InvalidTopicError,
    OutboxError,
    PayloadSerializationError,
    PayloadTooLargeError,
    SchemaError,
    SchemaMismatchError,
    SchemaMissingError,
    SchemaOutdatedError,
    TransactionRequiredError,
    UnsupportedConnectionError,
)
from outbox.settings import SHARD_COUNT, OutboxSettings
from outbox.writer import Outbox, default, set_default

if TYPE_CHECKING:
    from outbox.connections import AsyncDB, SyncDB

__all__ = [
    "EVENT_ID_HEADER",
    "SHARD_COUNT",
    "ConfigurationError",
    "Envelope",
    "Event",
    "InvalidEventError",
    "InvalidHeaderError",
    "InvalidIdentifierError",
    "InvalidKeyError",
    "InvalidScheduleError",
    "InvalidTopicError",
    "Outbox",
    "OutboxError",
    "OutboxSettings",
    "PayloadSerializationError",
    "PayloadTooLargeError",
    "SchemaError",
    "SchemaMismatchError",
    "SchemaMissingError",
    "SchemaOutdatedError",
    "TransactionRequiredError",
    "UnsupportedConnectionError",
    "add",
    "add_async",
    "add_many",
    "add_many_async",
    "cancel",
    "cancel_async",
    "configure",
    "dedup",
    "json_serializer",
]


def configure(
    settings: OutboxSettings | None = None, *, serializer: Serializer = json_serializer
) -> Outbox:
    """Replace the settings and serializer used by the module-level functions; call at start-up.

    The settings also become the default of :mod:`outbox.dedup` (``claim``, ``purge``...), so
    the dedup records go to the same schema and table prefix as the events.
    """
    writer = Outbox(settings, serializer=serializer)
    set_default(writer)
    return writer


def add(
    db: SyncDB,
    topic: str,
    payload: Any,
    *,
    key: Key | None = None,
    headers: Headers | None = None,
    serializer: Serializer | None = None,
    deliver_at: dt.datetime | None = None,
    delay: dt.timedelta | None = None,
) -> uuid.UUID:
    """Write one event in ``db``'s current transaction and return its event id.

    ``db`` is a SQLAlchemy ``Session`` or ``Connection``, or a psycopg ``Connection``. ``payload``
    is sent as is when ``bytes``, as UTF-8 when ``str``, and JSON-encoded otherwise. Never commits.

    To deliver it later, give ``deliver_at`` (an aware ``datetime``) or ``delay`` (a
    ``timedelta`` >= 0 counted on the database server's clock from this statement), not both: the
    event waits in the scheduled table until then, and :func:`cancel` can still take it back.
    """
    return default().add(
        db,
        topic,
        payload,
        key=key,
        headers=headers,
        serializer=serializer,
        deliver_at=deliver_at,
        delay=delay,
    )


def add_many(
    db: SyncDB, events: Iterable[Event], *, serializer: Serializer | None = None
) -> list[uuid.UUID]:
    """Write many events in one round trip (per 5,000 events), in order; returns their ids."""
    return default().add_many(db, events, serializer=serializer)


async def add_async(
    db: AsyncDB,
    topic: str,
    payload: Any,
    *,
    key: Key | None = None,
    headers: Headers | None = None,
    serializer: Serializer | None = None,
    deliver_at: dt.datetime | None = None,
    delay: dt.timedelta | None = None,
) -> uuid.UUID:
    """Async :func:`add`, for SQLAlchemy ``AsyncSession``/``AsyncConnection`` and psycopg's."""
    return await default().add_async(
        db,
        topic,
        payload,
        key=key,
        headers=headers,
        serializer=serializer,
        deliver_at=deliver_at,
        delay=delay,
    )


async def add_many_async(
    db: AsyncDB, events: Iterable[Event], *, serializer: Serializer | None = None
) -> list[uuid.UUID]:
    """Async :func:`add_many`."""
    return await default().add_many_async(db, events, serializer=serializer)


def cancel(db: SyncDB, event_id: uuid.UUID | str) -> bool:
    """Take back an event written with ``deliver_at`` or ``delay`` that has not fallen due yet:
    delete it from the scheduled table in ``db``'s current transaction. Never commits.

    True if it deleted it; False if no such event waits there (already released into the
    outbox, cancelled, or never scheduled). The release skips a row whose cancel is still in an
    open transaction; a cancel that rolls back leaves the event to go out at the next release.
    """
    return default().cancel(db, event_id)


async def cancel_async(db: AsyncDB, event_id: uuid.UUID | str) -> bool:
    """Async :func:`cancel`."""
    return await default().cancel_async(db, event_id)
