"""``add`` and ``add_many``: write events into the outbox inside the caller's transaction.

Sync and async entry points share one pure statement builder; only the final ``execute`` call
differs. Every event is validated and encoded before any I/O, so a rejected event leaves the
caller's transaction untouched and usable.
"""

from __future__ import annotations

import functools
import uuid
from collections.abc import Iterable, Iterator, Sequence
from typing import TYPE_CHECKING, Any

from psycopg import sql as pg_sql

from outbox.connections import execute, execute_async
from outbox.envelope import Envelope, Event, Headers, Key, Serializer, json_serializer, seal
from outbox.settings import OutboxSettings
from outbox.tracing import with_trace_context

if TYPE_CHECKING:
    from outbox.connections import AsyncDB, SyncDB

#: Six parameters a row; PostgreSQL takes at most 65,535 parameters in one statement.
MAX_ROWS_PER_STATEMENT = 5000

_COLUMNS = pg_sql.SQL("event_id, topic, key, payload, header_names, header_values")
_ROW = "(%s, %s, %s, %s, %s, %s)"


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


def statements(
    settings: OutboxSettings, envelopes: Sequence[Envelope]
) -> Iterator[tuple[str, list[object]]]:
    """Split the envelopes into as few INSERT statements as PostgreSQL allows, in order."""
    for start in range(0, len(envelopes), MAX_ROWS_PER_STATEMENT):
        chunk = envelopes[start : start + MAX_ROWS_PER_STATEMENT]
        yield insert_sql(settings, len(chunk)), insert_params(chunk)


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
    ) -> uuid.UUID:
        """Write one event in ``db``'s transaction and return its event id. Never commits."""
        envelope = self._seal(Event(topic, payload, key, headers), serializer)
        execute(db, insert_sql(self.settings, 1), insert_params([envelope]))
        return envelope.event_id

    def add_many(
        self, db: SyncDB, events: Iterable[Event], *, serializer: Serializer | None = None
    ) -> list[uuid.UUID]:
        """Write many events in one statement (per 5,000 events), in the given order."""
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
    ) -> uuid.UUID:
        """The async twin of :meth:`add`."""
        envelope = self._seal(Event(topic, payload, key, headers), serializer)
        await execute_async(db, insert_sql(self.settings, 1), insert_params([envelope]))
        return envelope.event_id

    async def add_many_async(
        self, db: AsyncDB, events: Iterable[Event], *, serializer: Serializer | None = None
    ) -> list[uuid.UUID]:
        """The async twin of :meth:`add_many`."""
        envelopes = [self._seal(event, serializer) for event in events]
        for sql, params in statements(self.settings, envelopes):
            await execute_async(db, sql, params)
        return [envelope.event_id for envelope in envelopes]

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
