"""``add`` and ``add_many``: write events into the outbox inside the caller's transaction.

Sync and async entry points share one pure statement builder; only the final ``execute`` call
differs. Every event is validated and encoded before any I/O, so a rejected event leaves the
caller's transaction untouched and usable. An event to deliver later goes into the scheduled
table instead, until a relay moves it into the outbox (``release_due``); ``cancel`` deletes it
from there.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any, TypeVar

from psycopg import sql as pg_sql

from outbox.connections import execute, execute_async
from outbox.envelope import (
    Envelope,
    Event,
    Headers,
    Key,
    ScheduledEnvelope,
    Serializer,
    json_serializer,
    parse_event_id,
    seal,
)
from outbox.settings import OutboxSettings
from outbox.tracing import with_trace_context

if TYPE_CHECKING:
    import datetime as dt

    from outbox.connections import AsyncDB, SyncDB

#: Six parameters a row (eight for a scheduled one); PostgreSQL takes at most 65,535 parameters
#: in one statement.
MAX_ROWS_PER_STATEMENT = 5000

_COLUMNS = pg_sql.SQL("event_id, topic, key, payload, header_names, header_values")
_ROW = "(%s, %s, %s, %s, %s, %s)"
# The due time of a delay is counted on the server's clock, so the client's skew does not matter.
_SCHEDULED_COLUMNS = pg_sql.SQL(
    "event_id, topic, key, payload, header_names, header_values, due_at"
)
_SCHEDULED_ROW = (
    "(%s, %s, %s, %s, %s, %s, COALESCE(%s::timestamptz, statement_timestamp() + %s::interval))"
)
_CANCEL = "DELETE FROM {scheduled} WHERE event_id = %s"


@functools.lru_cache(maxsize=16)
def _insert_head(settings: OutboxSettings) -> str:
    return settings.sql(
        "INSERT INTO {events} ({columns}) VALUES ", events="events", columns=_COLUMNS
    )


@functools.lru_cache(maxsize=64)
def insert_sql(settings: OutboxSettings, rows: int) -> str:
    """One multi-row INSERT for ``rows`` events; identifiers come from the settings only."""
    return _insert_head(settings) + ", ".join([_ROW] * rows)


def insert_params(envelopes: Sequence[Envelope]) -> list[object]:
    """The flat parameter list matching :func:`insert_sql` for these envelopes."""
    params: list[object] = []
    for env in envelopes:
        names = [name for name, _ in env.headers]
        values = [value for _, value in env.headers]
        params += (env.event_id, env.topic, env.key, env.payload, names, values)
    return params


@functools.lru_cache(maxsize=64)
def schedule_sql(settings: OutboxSettings, rows: int) -> str:
    """One multi-row INSERT of ``rows`` events into the scheduled table."""
    head = settings.sql(
        "INSERT INTO {scheduled} ({columns}) VALUES ",
        scheduled="scheduled",
        columns=_SCHEDULED_COLUMNS,
    )
    return head + ", ".join([_SCHEDULED_ROW] * rows)


def schedule_params(envelopes: Sequence[ScheduledEnvelope]) -> list[object]:
    """The flat parameter list matching :func:`schedule_sql` for these scheduled envelopes."""
    params: list[object] = []
    for env in envelopes:
        names = [name for name, _ in env.headers]
        values = [value for _, value in env.headers]
        params += (env.event_id, env.topic, env.key, env.payload, names, values)
        params += (env.deliver_at, env.delay)
    return params


@functools.lru_cache(maxsize=16)
def cancel_sql(settings: OutboxSettings) -> str:
    """Delete one scheduled event by its event id."""
    return settings.sql(_CANCEL, scheduled="scheduled")


_E = TypeVar("_E", bound=Envelope)


def _chunks(
    settings: OutboxSettings,
    envelopes: Sequence[_E],
    sql: Callable[[OutboxSettings, int], str],
    params: Callable[[Sequence[_E]], list[object]],
) -> Iterator[tuple[str, list[object]]]:
    for start in range(0, len(envelopes), MAX_ROWS_PER_STATEMENT):
        chunk = envelopes[start : start + MAX_ROWS_PER_STATEMENT]
        yield sql(settings, len(chunk)), params(chunk)


def statements(
    settings: OutboxSettings, envelopes: Sequence[Envelope]
) -> Iterator[tuple[str, list[object]]]:
    """Split the envelopes into as few INSERT statements as PostgreSQL allows, each table's rows
    in the given order: the outbox's first, then the scheduled table's."""
    later = [env for env in envelopes if isinstance(env, ScheduledEnvelope)]
    if later:
        envelopes = [env for env in envelopes if not isinstance(env, ScheduledEnvelope)]
    yield from _chunks(settings, envelopes, insert_sql, insert_params)
    yield from _chunks(settings, later, schedule_sql, schedule_params)


def statement(settings: OutboxSettings, envelope: Envelope) -> tuple[str, list[object]]:
    """The INSERT of one event, into the outbox or, to deliver it later, the scheduled table."""
    if isinstance(envelope, ScheduledEnvelope):
        return schedule_sql(settings, 1), schedule_params([envelope])
    return insert_sql(settings, 1), insert_params([envelope])


class Outbox:
    """A configured writer. Module-level :func:`outbox.add` uses a default instance."""

    def __init__(
        self, settings: OutboxSettings | None = None, *, serializer: Serializer = json_serializer
    ) -> None:
        self.settings = settings or OutboxSettings()
        self.serializer = serializer

    def add(
        self,
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
        """Write one event in ``db``'s transaction and return its event id. Never commits.

        With ``deliver_at`` (an aware datetime) or ``delay`` (a timedelta counted on the database
        server's clock), the event waits in the scheduled table until then."""
        event = Event(topic, payload, key, headers, deliver_at, delay)
        envelope = self._seal(event, serializer)
        execute(db, *statement(self.settings, envelope))
        return envelope.event_id

    def add_many(
        self, db: SyncDB, events: Iterable[Event], *, serializer: Serializer | None = None
    ) -> list[uuid.UUID]:
        """Write many events in one statement (per 5,000 events), in the given order; those to
        deliver later (``Event.deliver_at`` or ``delay``) in one more, into the scheduled table."""
        envelopes = [self._seal(event, serializer) for event in events]
        for sql, params in statements(self.settings, envelopes):
            execute(db, sql, params)
        return [envelope.event_id for envelope in envelopes]

    async def add_async(
        self,
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
        """The async twin of :meth:`add`."""
        event = Event(topic, payload, key, headers, deliver_at, delay)
        envelope = self._seal(event, serializer)
        await execute_async(db, *statement(self.settings, envelope))
        return envelope.event_id

    async def add_many_async(
        self, db: AsyncDB, events: Iterable[Event], *, serializer: Serializer | None = None
    ) -> list[uuid.UUID]:
        """The async twin of :meth:`add_many`."""
        envelopes = [self._seal(event, serializer) for event in events]
        for sql, params in statements(self.settings, envelopes):
            await execute_async(db, sql, params)
        return [envelope.event_id for envelope in envelopes]

    def cancel(self, db: SyncDB, event_id: uuid.UUID | str) -> bool:
        """Delete the event ``event_id`` from the scheduled table in ``db``'s transaction; False
        if no such event waits there (released, cancelled or never scheduled). Never commits."""
        sql, params = self._cancel(event_id)
        return execute(db, sql, params).rowcount == 1

    async def cancel_async(self, db: AsyncDB, event_id: uuid.UUID | str) -> bool:
        """The async twin of :meth:`cancel`."""
        sql, params = self._cancel(event_id)
        return (await execute_async(db, sql, params)).rowcount == 1

    def _cancel(self, event_id: object) -> tuple[str, tuple[uuid.UUID]]:
        return cancel_sql(self.settings), (parse_event_id(event_id),)

    def _seal(self, event: Event, serializer: Serializer | None) -> Envelope:
        event = with_trace_context(event)  # with OpenTelemetry: the current trace's headers
        return seal(event, settings=self.settings, serializer=serializer or self.serializer)


_default = Outbox()


def default() -> Outbox:
    """The writer behind ``outbox.add`` and the other module-level functions, as
    :func:`outbox.configure` last set it; its settings are also ``outbox.dedup``'s default."""
    return _default


def set_default(writer: Outbox) -> None:
    """Make ``writer`` the one :func:`default` returns (what :func:`outbox.configure` does)."""
    global _default
    _default = writer
