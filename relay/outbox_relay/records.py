"""What a claimed row becomes on Kafka, in each ``--record-format``: pure, no I/O.

* ``native``: the payload as the value, the row's headers and ``event_id``. Not shaped here: the
  publisher builds these records inline (:data:`NATIVE` is None), as it always has, because they
  are the relay's full-rate path.
* ``debezium``: as Debezium's Outbox Event Router writes them (:func:`debezium_record`).
* ``cloudevents-binary`` and ``cloudevents-structured``: CloudEvents 1.0, the Kafka binding's two
  modes (:mod:`outbox.cloudevents`).

Topic and key are always the row's; a shape gives the value and the headers. The publisher picks
the shape once (:func:`shaper`), not per row.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import TypeAlias

from outbox import cloudevents, urls
from outbox.errors import ConfigurationError
from outbox_relay.config import RECORD_FORMATS, RelaySettings
from outbox_relay.ports import ClaimedRow

NATIVE = "native"
DEBEZIUM = "debezium"
CLOUDEVENTS_BINARY = "cloudevents-binary"
CLOUDEVENTS_STRUCTURED = "cloudevents-structured"

#: Debezium's router puts the event id in this header.
DEBEZIUM_ID_HEADER = "id"

#: Message headers as confluent-kafka takes them.
Headers: TypeAlias = cloudevents.MessageHeaders
#: A row's message value and headers.
Record: TypeAlias = tuple[bytes, Headers]
Shape: TypeAlias = Callable[[ClaimedRow], Record]


def debezium_record(row: ClaimedRow) -> Record:
    """Debezium's Outbox Event Router's record: the value as stored, the event id (its UUID
    text) in the header ``id``, then the row's own headers."""
    headers: Headers = [(DEBEZIUM_ID_HEADER, row.event_id.encode())]
    if row.header_names:
        headers.extend(zip(row.header_names, row.header_values, strict=True))
    return row.payload, headers


def default_source(database_url: str) -> str:
    """The CloudEvents ``source`` of rows that name none: ``/outbox/<database>``, the outbox
    the event was written to. Event ids are UUIDs, unique whatever the source, so the spec's
    rule that ``source`` and ``id`` together identify an event holds for every outbox."""
    try:
        database = urls.parse(database_url).database
    except ConfigurationError:
        database = None
    return f"/outbox/{database or 'outbox'}"


def cloudevents_binary(source: str, type: str | None) -> Shape:
    """Binary mode: the payload as the value, the attributes as ``ce_`` headers. ``source`` and
    ``type`` (None: the row's topic) for rows without their own ``ce_source``/``ce_type``."""
    source_bytes = source.encode()
    type_bytes = type.encode() if type else None
    binary_headers = cloudevents.binary_headers

    def shape(row: ClaimedRow) -> Record:
        headers = row.headers if row.header_names else ()
        event_type = type_bytes or row.topic.encode()
        found = binary_headers(row.event_id, headers, source=source_bytes, type=event_type)
        return row.payload, found

    return shape


def cloudevents_structured(source: str, type: str | None) -> Shape:
    """Structured mode: the whole event (attributes and data) as one JSON value."""

    def shape(row: ClaimedRow) -> Record:
        return cloudevents.structured_value(
            row.event_id, row.payload, row.headers, source=source, type=type or row.topic
        )

    return shape


def shaper(record_format: str, *, source: str, type: str | None) -> Shape | None:
    """The shape of ``record_format``'s records; None for ``native`` (built inline)."""
    if record_format == NATIVE:
        return None
    if record_format == DEBEZIUM:
        return debezium_record
    if record_format == CLOUDEVENTS_BINARY:
        return cloudevents_binary(source, type)
    if record_format == CLOUDEVENTS_STRUCTURED:
        return cloudevents_structured(source, type)
    raise ValueError(f"unknown record format {record_format!r}; known: {', '.join(RECORD_FORMATS)}")


def shaper_of(settings: RelaySettings) -> Shape | None:
    """The shape of the relay's ``--record-format`` (None: native, built inline)."""
    source = settings.cloudevents_source or default_source(settings.database_url)
    return shaper(settings.record_format, source=source, type=settings.cloudevents_type or None)
