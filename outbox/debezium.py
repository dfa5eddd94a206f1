"""Events written for consumers of Debezium's Outbox Event Router: ``add`` and ``add_many``.

An event is an ordinary outbox row shaped as the router shapes its record, so a relay run
with ``--record-format debezium`` sends what Debezium would have sent, byte for byte, for the
Connect configuration pinned here (``docs/debezium.md``; the golden test
``tests/acceptance/test_debezium_golden.py`` runs Debezium itself to prove it):

* Debezium's documented outbox table, ``payload jsonb``;
* ``key.converter`` and ``value.converter`` ``org.apache.kafka.connect.storage.StringConverter``;
* the Outbox Event Router with its default routing (topic ``outbox.event.<aggregatetype>``)
  and ``table.fields.additional.placement=type:header:eventType``.

The row's topic is ``outbox.event.<aggregate type>``, its key the aggregate id (UTF-8), its
header ``eventType`` the event type, its payload the JSON text as PostgreSQL's ``jsonb``
prints it: normalized in the INSERT by PostgreSQL itself (spacing, key order, duplicate keys,
numbers), since only ``jsonb``'s own output function gives exactly Debezium's bytes. The relay
puts the event id in header ``id`` before the row's headers, as the router does.
"""

from __future__ import annotations

import decimal
import functools
import json
import uuid
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any

from psycopg import sql as pg_sql

from outbox.connections import execute, execute_async
from outbox.envelope import (
    Envelope,
    Event,
    Headers,
    encode_payload,
    json_serializer,
    seal,
    validate_topic,
)
from outbox.errors import InvalidEventError, InvalidHeaderError, PayloadSerializationError
from outbox.settings import OutboxSettings
from outbox.writer import MAX_ROWS_PER_STATEMENT, default, insert_params

if TYPE_CHECKING:
    from outbox.connections import AsyncDB, SyncDB

#: The router's default ``route.topic.replacement`` is ``outbox.event.${routedByValue}``.
TOPIC_PREFIX = "outbox.event."
#: Where the router puts the event id (the ``id`` column); the relay sets it.
ID_HEADER = "id"
#: Where the pinned ``table.fields.additional.placement`` puts the ``type`` column.
EVENT_TYPE_HEADER = "eventType"
#: Debezium's outbox table holds ``aggregatetype``, ``aggregateid`` and ``type`` as
#: ``varchar(255)``: longer values could not go back through it.
MAX_FIELD_LENGTH = 255

# numeric, which jsonb stores numbers as, holds up to 131,072 digits before the point and
# 16,383 after; PostgreSQL refuses a number beyond either.
_MAX_NUMERIC_WEIGHT = 131_072
_MAX_NUMERIC_SCALE = 16_383

_COLUMNS = pg_sql.SQL("event_id, topic, key, payload, header_names, header_values")
# The payload arrives as UTF-8 bytes and is stored as jsonb prints it, also in UTF-8.
_ROW = "(%s, %s, %s, convert_to(CAST(convert_from(%s, 'UTF8') AS jsonb)::text, 'UTF8'), %s, %s)"


@dataclass(frozen=True, slots=True)
class DebeziumEvent:
    """One event for :func:`add_many`, in the outbox table's terms.

    ``payload`` is a JSON-serializable object, or JSON text as ``str`` or UTF-8 ``bytes``.
    ``topic`` replaces ``outbox.event.<aggregate_type>`` when the connector has its own
    ``route.topic.replacement`` (give the topic that replacement makes). ``headers`` are the
    connector's further ``header`` placements, after ``eventType``, in its order.
    """

    aggregate_type: str
    aggregate_id: str
    event_type: str
    payload: Any
    topic: str | None = None
    headers: Headers | None = None


def topic_of(aggregate_type: str) -> str:
    """The router's default topic for an aggregate type: ``outbox.event.<aggregate_type>``."""
    _check_field(aggregate_type, "aggregate_type")
    try:
        return validate_topic(TOPIC_PREFIX + aggregate_type)
    except InvalidEventError as exc:
        raise type(exc)(f"aggregate_type {aggregate_type!r} does not make a topic: {exc}") from exc


def _check_field(value: object, what: str) -> str:
    if not isinstance(value, str):
        raise InvalidEventError(f"{what} must be a str, got {type(value).__name__}")
    if not value or "\x00" in value:
        raise InvalidEventError(f"{what} {value!r} must be non-empty and contain no NUL")
    if len(value) > MAX_FIELD_LENGTH:
        raise InvalidEventError(
            f"{what} is {len(value)} characters; Debezium's outbox table holds "
            f"{MAX_FIELD_LENGTH} (varchar({MAX_FIELD_LENGTH}))"
        )
    return value


def _headers(event: DebeziumEvent) -> dict[str, Any]:
    headers: dict[str, Any] = {EVENT_TYPE_HEADER: _check_field(event.event_type, "event_type")}
    if event.headers is None:
        return headers
    if not isinstance(event.headers, Mapping):
        raise InvalidHeaderError(
            f"headers must be a mapping of str to str or bytes, got {type(event.headers).__name__}"
        )
    for name, value in event.headers.items():
        if name in (ID_HEADER, EVENT_TYPE_HEADER):
            raise InvalidHeaderError(
                f"header name {name!r} is reserved: the record carries the event's "
                f"{'id' if name == ID_HEADER else 'type'} there"
            )
        headers[name] = value
    return headers


def json_text(payload: object) -> bytes:
    """The payload as UTF-8 JSON text that PostgreSQL's ``jsonb`` accepts, or raise
    PayloadSerializationError: objects through the default serializer, ``str`` and ``bytes``
    checked as they are (jsonb normalizes them in the INSERT)."""
    raw = encode_payload(payload, json_serializer)
    try:
        # Decimal for every number: jsonb holds numeric, and int() refuses over 4,300 digits.
        value = json.loads(
            raw, parse_constant=_no_constant, parse_float=decimal.Decimal, parse_int=decimal.Decimal
        )
    except (ValueError, RecursionError) as exc:  # UnicodeDecodeError is a ValueError
        raise PayloadSerializationError(f"payload is not JSON text: {exc}") from exc
    _check_value(value)
    return raw


def _no_constant(name: str) -> Any:
    raise ValueError(f"{name} is not JSON (PostgreSQL's jsonb refuses it)")


def _check_value(value: object) -> None:
    """What Python's JSON parser takes and jsonb refuses: ``\\u0000``, lone surrogates, and
    numbers beyond PostgreSQL's numeric."""
    stack = [value]
    while stack:
        item = stack.pop()
        if isinstance(item, dict):
            stack.extend(item.keys())
            stack.extend(item.values())
        elif isinstance(item, list):
            stack.extend(item)
        elif isinstance(item, str):
            _check_text(item)
        elif isinstance(item, decimal.Decimal):
            _check_number(item)


def _check_text(text: str) -> None:
    if "\x00" in text:
        raise PayloadSerializationError("payload holds \\u0000, which PostgreSQL's jsonb refuses")
    try:
        text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise PayloadSerializationError(
            f"payload holds a lone surrogate, which PostgreSQL's jsonb refuses: {exc}"
        ) from exc


def _check_number(number: decimal.Decimal) -> None:
    exponent = number.as_tuple().exponent
    scale = -exponent if isinstance(exponent, int) else 0
    if (
        not number.is_zero() and number.adjusted() >= _MAX_NUMERIC_WEIGHT
    ) or scale > _MAX_NUMERIC_SCALE:
        raise PayloadSerializationError(
            f"payload number {number:.6e} is beyond PostgreSQL's numeric, which jsonb stores"
        )


def seal_event(event: DebeziumEvent, settings: OutboxSettings) -> Envelope:
    """Validate and encode one event before any I/O: the envelope's payload is the JSON text
    as given (PostgreSQL normalizes it in the INSERT)."""
    if not isinstance(event, DebeziumEvent):
        raise InvalidEventError(f"expected a DebeziumEvent, got {type(event).__name__}")
    topic = topic_of(event.aggregate_type) if event.topic is None else event.topic
    key = _check_field(event.aggregate_id, "aggregate_id")
    payload = json_text(event.payload)
    plain = Event(topic, payload, key, _headers(event))
    return seal(plain, settings=settings, serializer=json_serializer)


@functools.lru_cache(maxsize=64)
def insert_sql(settings: OutboxSettings, rows: int) -> str:
    """One multi-row INSERT whose payloads PostgreSQL normalizes as ``jsonb`` prints them."""
    head = settings.sql(
        "INSERT INTO {events} ({columns}) VALUES ", events="events", columns=_COLUMNS
    )
    return head + ", ".join([_ROW] * rows)


def _statements(
    settings: OutboxSettings, envelopes: Sequence[Envelope]
) -> Iterable[tuple[str, list[object]]]:
    for start in range(0, len(envelopes), MAX_ROWS_PER_STATEMENT):
        chunk = envelopes[start : start + MAX_ROWS_PER_STATEMENT]
        yield insert_sql(settings, len(chunk)), insert_params(chunk)


def _seal_all(
    events: Iterable[DebeziumEvent], settings: OutboxSettings | None
) -> tuple[OutboxSettings, list[Envelope]]:
    settings = settings or default().settings
    return settings, [seal_event(event, settings) for event in events]


def add(
    db: SyncDB,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    topic: str | None = None,
    headers: Headers | None = None,
    settings: OutboxSettings | None = None,
) -> uuid.UUID:
    """Write one event in ``db``'s transaction, as Debezium's Outbox Event Router would
    publish it; return its event id (header ``id``). Never commits."""
    event = DebeziumEvent(aggregate_type, aggregate_id, event_type, payload, topic, headers)
    return add_many(db, [event], settings=settings)[0]


def add_many(
    db: SyncDB, events: Iterable[DebeziumEvent], *, settings: OutboxSettings | None = None
) -> list[uuid.UUID]:
    """Write many events in one statement (per 5,000 events), in the given order."""
    settings, envelopes = _seal_all(events, settings)
    for sql, params in _statements(settings, envelopes):
        execute(db, sql, params)
    return [envelope.event_id for envelope in envelopes]


async def add_async(
    db: AsyncDB,
    *,
    aggregate_type: str,
    aggregate_id: str,
    event_type: str,
    payload: Any,
    topic: str | None = None,
    headers: Headers | None = None,
    settings: OutboxSettings | None = None,
) -> uuid.UUID:
    """The async twin of :func:`add`."""
    event = DebeziumEvent(aggregate_type, aggregate_id, event_type, payload, topic, headers)
    return (await add_many_async(db, [event], settings=settings))[0]


async def add_many_async(
    db: AsyncDB, events: Iterable[DebeziumEvent], *, settings: OutboxSettings | None = None
) -> list[uuid.UUID]:
    """The async twin of :func:`add_many`."""
    settings, envelopes = _seal_all(events, settings)
    for sql, params in _statements(settings, envelopes):
        await execute_async(db, sql, params)
    return [envelope.event_id for envelope in envelopes]
