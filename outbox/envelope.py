"""The event envelope: what an application asks to publish, and the validated bytes we store.

Pure code, no I/O. :func:`seal` turns an :class:`Event` into an :class:`Envelope` or raises an
:class:`~outbox.errors.InvalidEventError` that names the problem, before anything is written.
"""

from __future__ import annotations

import dataclasses
import datetime as dt
import decimal
import enum
import json
import os
import re
import time
import uuid
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from typing import Any, TypeAlias

from outbox.errors import (
    InvalidHeaderError,
    InvalidKeyError,
    InvalidScheduleError,
    InvalidTopicError,
    PayloadSerializationError,
    PayloadTooLargeError,
)
from outbox.settings import OutboxSettings

#: The Kafka header carrying the event's id; consumers deduplicate on it. Reserved.
EVENT_ID_HEADER = "event_id"

#: Kafka refuses longer topic names.
MAX_TOPIC_LENGTH = 249

_TOPIC = re.compile(r"[a-zA-Z0-9._-]+")

Key: TypeAlias = str | bytes
HeaderValue: TypeAlias = str | bytes
Headers: TypeAlias = Mapping[str, HeaderValue]
Serializer: TypeAlias = Callable[[Any], bytes]


@dataclass(frozen=True, slots=True)
class Event:
    """An event to write with :func:`outbox.add_many`: topic, payload, optional key and headers,
    and, to deliver it later, either ``deliver_at`` (an aware datetime) or ``delay`` (counted on
    the database server's clock from the INSERT)."""

    topic: str
    payload: Any
    key: Key | None = None
    headers: Headers | None = None
    deliver_at: dt.datetime | None = None
    delay: dt.timedelta | None = None


@dataclass(frozen=True, slots=True)
class Envelope:
    """A validated event, encoded as it is stored and as it will be sent to Kafka."""

    event_id: uuid.UUID
    topic: str
    key: bytes | None
    payload: bytes
    headers: tuple[tuple[str, bytes], ...]


@dataclass(frozen=True, slots=True)
class ScheduledEnvelope(Envelope):
    """An envelope to deliver later: it waits in the scheduled table until it falls due, at
    ``deliver_at`` or ``delay`` after the INSERT on the database server's clock (one is set).
    A subclass, so that an event sent now builds no more than it did before scheduling."""

    deliver_at: dt.datetime | None
    delay: dt.timedelta | None


def new_event_id() -> uuid.UUID:
    """A UUIDv7 (RFC 9562): unique, ordered by creation time to the millisecond (random within
    one), which keeps the unique index compact. Rows are ordered by ``id``, not by this."""
    millis = time.time_ns() // 1_000_000
    rand = int.from_bytes(os.urandom(10), "big")
    value = (millis & (2**48 - 1)) << 80
    value |= 0x7 << 76  # version
    value |= (rand >> 68) << 64  # 12 bits rand_a
    value |= 0b10 << 62  # variant
    value |= rand & (2**62 - 1)  # 62 bits rand_b
    return uuid.UUID(int=value)


def _json_default(value: Any) -> Any:
    if isinstance(value, dt.datetime | dt.date | dt.time):
        return value.isoformat()
    if isinstance(value, uuid.UUID | decimal.Decimal):
        return str(value)
    if isinstance(value, enum.Enum):
        return value.value
    if dataclasses.is_dataclass(value) and not isinstance(value, type):
        return dataclasses.asdict(value)
    raise TypeError(f"Object of type {type(value).__name__} is not JSON serializable")


def json_serializer(payload: Any) -> bytes:
    """The default serializer: compact UTF-8 JSON; datetimes, dates, UUIDs, Decimals, enums and
    dataclasses are converted; anything else JSON cannot hold is refused."""
    return json.dumps(
        payload, default=_json_default, ensure_ascii=False, separators=(",", ":"), allow_nan=False
    ).encode("utf-8")


def validate_topic(topic: object) -> str:
    """Return ``topic`` if Kafka accepts it as a topic name, else raise InvalidTopicError."""
    if not isinstance(topic, str):
        raise InvalidTopicError(f"topic must be a str, got {type(topic).__name__}")
    if not topic:
        raise InvalidTopicError("topic must not be empty")
    if len(topic) > MAX_TOPIC_LENGTH:
        raise InvalidTopicError(
            f"topic is {len(topic)} characters; Kafka allows at most {MAX_TOPIC_LENGTH}"
        )
    if topic in (".", "..") or not _TOPIC.fullmatch(topic):
        raise InvalidTopicError(
            f"topic {topic!r} is not a valid Kafka topic name: use only ASCII letters, digits, "
            "'.', '_' and '-' (and not '.' or '..' alone)"
        )
    return topic


def encode_key(key: object) -> bytes | None:
    """Keys are stored and sent as bytes; ``str`` is encoded as UTF-8."""
    if key is None or isinstance(key, bytes):
        return key
    if isinstance(key, bytearray | memoryview):
        return bytes(key)
    if isinstance(key, str):
        return _utf8(key, InvalidKeyError, "key")
    raise InvalidKeyError(f"key must be str or bytes, got {type(key).__name__}")


def encode_headers(headers: object) -> tuple[tuple[str, bytes], ...]:
    """Headers become (name, bytes) pairs in the mapping's order; ``event_id`` is reserved."""
    if headers is None:
        return ()
    if not isinstance(headers, Mapping):
        raise InvalidHeaderError(
            f"headers must be a mapping of str to str or bytes, got {type(headers).__name__}"
        )
    return tuple(_encode_header(name, value) for name, value in headers.items())


def _encode_header(name: object, value: object) -> tuple[str, bytes]:
    if not isinstance(name, str):
        raise InvalidHeaderError(f"header name must be a str, got {type(name).__name__}")
    if not name or "\x00" in name:
        raise InvalidHeaderError(f"header name {name!r} must be non-empty and contain no NUL")
    if name == EVENT_ID_HEADER:
        raise InvalidHeaderError(
            f"header name {EVENT_ID_HEADER!r} is reserved: the relay sets it to the event's id"
        )
    _utf8(name, InvalidHeaderError, f"header name {name!r}")
    if isinstance(value, bytes):
        return name, value
    if isinstance(value, bytearray | memoryview):
        return name, bytes(value)
    if isinstance(value, str):
        return name, _utf8(value, InvalidHeaderError, f"header {name!r}")
    raise InvalidHeaderError(
        f"header {name!r} must have a str or bytes value, got {type(value).__name__}"
    )


def check_schedule(
    deliver_at: object, delay: object
) -> tuple[dt.datetime | None, dt.timedelta | None]:
    """Return ``(deliver_at, delay)`` if they say when to deliver, else raise
    InvalidScheduleError: an aware datetime or a timedelta >= 0, not both (neither: now)."""
    if deliver_at is None and delay is None:
        return None, None
    if deliver_at is not None and delay is not None:
        raise InvalidScheduleError("give deliver_at or delay, not both")
    if delay is None:
        return _check_deliver_at(deliver_at), None
    return None, _check_delay(delay)


def _check_deliver_at(deliver_at: object) -> dt.datetime:
    if not isinstance(deliver_at, dt.datetime):
        raise InvalidScheduleError(
            f"deliver_at must be a datetime.datetime, got {type(deliver_at).__name__}"
        )
    if deliver_at.utcoffset() is None:
        raise InvalidScheduleError(
            f"deliver_at {deliver_at.isoformat()} is a naive datetime, which names no instant: "
            "give it a time zone (datetime.now(datetime.UTC) + ...), or pass delay= instead"
        )
    return deliver_at


def _check_delay(delay: object) -> dt.timedelta:
    if not isinstance(delay, dt.timedelta):
        raise InvalidScheduleError(
            f"delay must be a datetime.timedelta, got {type(delay).__name__}"
        )
    if delay < dt.timedelta(0):
        raise InvalidScheduleError(f"delay must not be negative, got {delay}")
    try:  # a due time Python could not read back; the server's clock is near enough for this
        dt.datetime.now(dt.UTC) + delay
    except OverflowError:
        raise InvalidScheduleError(f"delay {delay} puts the due time past the year 9999") from None
    return delay


def parse_event_id(event_id: object) -> uuid.UUID:
    """``event_id`` as a UUID (a ``uuid.UUID``, or a ``str`` parsed), else InvalidScheduleError."""
    if isinstance(event_id, uuid.UUID):
        return event_id
    if not isinstance(event_id, str):
        raise InvalidScheduleError(
            f"event_id must be a uuid.UUID or str, got {type(event_id).__name__}"
        )
    try:
        return uuid.UUID(event_id)
    except ValueError:
        raise InvalidScheduleError(f"event_id {event_id!r:.80} is not a UUID") from None


def encode_payload(payload: object, serializer: Serializer) -> bytes:
    """``bytes`` as is, ``str`` as UTF-8, anything else through the serializer."""
    if isinstance(payload, bytes):
        return payload
    if isinstance(payload, bytearray | memoryview):
        return bytes(payload)
    if isinstance(payload, str):
        return _utf8(payload, PayloadSerializationError, "payload")
    try:
        encoded = serializer(payload)
    except Exception as exc:  # a custom serializer may raise anything: name the payload's type
        raise PayloadSerializationError(
            f"cannot serialize payload of type {type(payload).__name__}: {exc}"
        ) from exc
    if not isinstance(encoded, bytes):
        raise PayloadSerializationError(
            f"the serializer must return bytes, it returned {type(encoded).__name__}"
        )
    return encoded


def _utf8(text: str, error: type[Exception], what: str) -> bytes:
    try:
        return text.encode("utf-8")
    except UnicodeEncodeError as exc:
        raise error(f"{what} is not valid Unicode: {exc}") from exc


def seal(event: Event, *, settings: OutboxSettings, serializer: Serializer) -> Envelope:
    """Validate and encode one event; raises before any I/O so the transaction stays usable."""
    topic = validate_topic(event.topic)
    key = encode_key(event.key)
    headers = encode_headers(event.headers)
    payload = encode_payload(event.payload, serializer)
    if len(payload) > settings.max_payload_bytes:
        raise PayloadTooLargeError(len(payload), settings.max_payload_bytes)
    if event.deliver_at is None and event.delay is None:
        return Envelope(new_event_id(), topic, key, payload, headers)
    deliver_at, delay = check_schedule(event.deliver_at, event.delay)
    return ScheduledEnvelope(new_event_id(), topic, key, payload, headers, deliver_at, delay)
