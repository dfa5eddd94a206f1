"""The envelope: validation and encoding of one event, before any I/O (pure, no database)."""

from __future__ import annotations

import datetime as dt
import decimal
import json
import time
import uuid
from typing import Any

import pytest

import outbox
from outbox.envelope import (
    Envelope,
    Event,
    ScheduledEnvelope,
    Serializer,
    check_schedule,
    json_serializer,
    new_event_id,
    parse_event_id,
    seal,
)


def sealed(
    topic: object = "orders",
    payload: object = b"{}",
    *,
    key: object = None,
    headers: object = None,
    serializer: Serializer = json_serializer,
    settings: outbox.OutboxSettings | None = None,
) -> Envelope:
    """Seal one event with the default settings unless told otherwise."""
    event = Event(topic, payload, key, headers)  # type: ignore[arg-type]
    return seal(event, settings=settings or outbox.OutboxSettings(), serializer=serializer)


# --- topics -------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "message"),
    [
        pytest.param("", "must not be empty", id="empty"),
        pytest.param("a" * 250, "250 characters; Kafka allows at most 249", id="250-chars"),
        pytest.param("a b", "'a b' is not a valid Kafka topic name", id="space"),
        pytest.param("a/b", "'a/b' is not a valid Kafka topic name", id="slash"),
        pytest.param("caf\u00e9", "'caf\u00e9' is not a valid Kafka topic name", id="non-ascii"),
        pytest.param(".", "'.' is not a valid Kafka topic name", id="dot"),
        pytest.param("..", "'..' is not a valid Kafka topic name", id="dot-dot"),
        pytest.param("a\nb", "is not a valid Kafka topic name", id="newline"),
        pytest.param(123, "topic must be a str, got int", id="int"),
        pytest.param(b"orders", "topic must be a str, got bytes", id="bytes"),
        pytest.param(None, "topic must be a str, got NoneType", id="none"),
    ],
)
def test_invalid_topic_is_rejected_with_a_message_naming_the_problem(
    topic: object, message: str
) -> None:
    """Topics Kafka would refuse raise InvalidTopicError saying what is wrong with them."""
    with pytest.raises(outbox.InvalidTopicError) as caught:
        sealed(topic)
    assert message in str(caught.value)


@pytest.mark.parametrize("topic", ["a" * 249, "x", "Orders.v1_created-2", "...", "_-."])
def test_valid_topic_is_accepted_unchanged(topic: str) -> None:
    """Topics of 1..249 characters from [a-zA-Z0-9._-] (other than '.' and '..') pass as is."""
    assert sealed(topic).topic == topic


# --- payloads -----------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        pytest.param(b"\x00\xff raw", b"\x00\xff raw", id="bytes-as-is"),
        pytest.param(bytearray(b"\x01\x02"), b"\x01\x02", id="bytearray"),
        pytest.param("h\u00e9llo \u2603", "h\u00e9llo \u2603".encode(), id="str-utf8"),
        pytest.param("", b"", id="empty-str"),
        pytest.param(
            {"b": 1, "a": [1, 2.5, None, True], "s": "\u00e9"},
            '{"b":1,"a":[1,2.5,null,true],"s":"\u00e9"}'.encode(),
            id="dict-compact-json",
        ),
        pytest.param([1, "x"], b'[1,"x"]', id="list"),
        pytest.param(None, b"null", id="none"),
    ],
)
def test_payload_encoding(payload: object, expected: bytes) -> None:
    """Bytes pass as is, str becomes UTF-8 and anything else compact UTF-8 JSON."""
    assert sealed(payload=payload).payload == expected


def test_default_serializer_handles_datetime_uuid_and_decimal() -> None:
    """Datetimes, dates, UUIDs and Decimals become their ISO / string forms in the JSON."""
    event_id = uuid.UUID("0190b5c8-7e4f-7abc-8def-0123456789ab")
    payload = {
        "at": dt.datetime(2024, 1, 2, 3, 4, 5, 600000, tzinfo=dt.UTC),
        "day": dt.date(2024, 2, 29),
        "id": event_id,
        "amount": decimal.Decimal("12.30"),
    }
    assert json.loads(sealed(payload=payload).payload) == {
        "at": "2024-01-02T03:04:05.600000+00:00",
        "day": "2024-02-29",
        "id": str(event_id),
        "amount": "12.30",
    }


@pytest.mark.parametrize(
    ("payload", "message"),
    [
        pytest.param(object(), "payload of type object", id="object"),
        pytest.param({"s": {1, 2}}, "payload of type dict", id="set-inside"),
        pytest.param(float("nan"), "payload of type float", id="nan"),
        pytest.param("\ud800", "payload is not valid Unicode", id="lone-surrogate"),
    ],
)
def test_unserializable_payload_is_rejected(payload: object, message: str) -> None:
    """A payload JSON cannot hold raises PayloadSerializationError naming its type."""
    with pytest.raises(outbox.PayloadSerializationError, match=message):
        sealed(payload=payload)


def test_custom_serializer_is_used_for_non_bytes_payloads() -> None:
    """A serializer passed in encodes objects; bytes and str payloads still bypass it."""
    seen: list[Any] = []

    def custom(value: Any) -> bytes:
        seen.append(value)
        return b"custom:" + repr(value).encode()

    assert sealed(payload={"a": 1}, serializer=custom).payload == b"custom:{'a': 1}"
    assert sealed(payload=b"raw", serializer=custom).payload == b"raw"
    assert sealed(payload="text", serializer=custom).payload == b"text"
    assert seen == [{"a": 1}]


def test_serializer_returning_non_bytes_is_rejected() -> None:
    """A serializer must return bytes; a str result raises PayloadSerializationError."""
    with pytest.raises(outbox.PayloadSerializationError, match="it returned str"):
        sealed(payload={"a": 1}, serializer=lambda value: json.dumps(value))  # type: ignore[arg-type,return-value]


@pytest.mark.parametrize(
    ("payload", "size"),
    [
        pytest.param(b"x" * 11, 11, id="bytes"),
        pytest.param("\u00e9" * 6, 12, id="str-counts-utf8-bytes"),
        pytest.param({"k": "123456"}, 14, id="json"),
    ],
)
def test_payload_over_the_limit_is_rejected_with_size_and_limit(payload: object, size: int) -> None:
    """The encoded size is checked against max_payload_bytes; the error carries both numbers."""
    settings = outbox.OutboxSettings(max_payload_bytes=10)
    with pytest.raises(outbox.PayloadTooLargeError) as caught:
        sealed(payload=payload, settings=settings)
    assert (caught.value.size, caught.value.limit) == (size, 10)
    assert f"payload is {size} bytes, over the limit of 10 bytes" in str(caught.value)


@pytest.mark.parametrize(
    "payload",
    [
        pytest.param(b"x" * 10, id="bytes"),
        pytest.param("\u00e9" * 5, id="str"),
        pytest.param({"k": "12"}, id="json"),
    ],
)
def test_payload_exactly_at_the_limit_is_accepted(payload: object) -> None:
    """An encoded payload of exactly max_payload_bytes bytes passes."""
    envelope = sealed(payload=payload, settings=outbox.OutboxSettings(max_payload_bytes=10))
    assert len(envelope.payload) == 10


# --- keys ---------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("key", "expected"),
    [
        ("order-1", b"order-1"),
        ("\u00e9", b"\xc3\xa9"),
        (b"\x00\xff", b"\x00\xff"),
        ("", b""),
        (None, None),
    ],
)
def test_key_is_encoded_to_bytes(key: object, expected: bytes | None) -> None:
    """str keys become UTF-8, bytes keys pass as is, no key stays None."""
    assert sealed(key=key).key == expected


@pytest.mark.parametrize(
    ("key", "message"),
    [
        (42, "key must be str or bytes, got int"),
        (uuid.UUID(int=1), "key must be str or bytes, got UUID"),
        ("\ud800", "key is not valid Unicode"),
    ],
)
def test_invalid_key_is_rejected(key: object, message: str) -> None:
    """Keys that are neither str nor bytes (or not encodable) raise InvalidKeyError."""
    with pytest.raises(outbox.InvalidKeyError, match=message):
        sealed(key=key)


# --- headers ------------------------------------------------------------------------------------


def test_headers_are_encoded_in_order() -> None:
    """str values become UTF-8, bytes values pass as is, in the mapping's order."""
    headers = {"trace": "abc", "bin": b"\x00\xff", "uni": "\u00e9"}
    assert sealed(headers=headers).headers == (
        ("trace", b"abc"),
        ("bin", b"\x00\xff"),
        ("uni", b"\xc3\xa9"),
    )
    assert sealed(headers=None).headers == sealed(headers={}).headers == ()


@pytest.mark.parametrize(
    ("headers", "message"),
    [
        pytest.param({"event_id": "x"}, "'event_id' is reserved", id="reserved"),
        pytest.param({1: "x"}, "header name must be a str, got int", id="non-str-name"),
        pytest.param({"": "x"}, "header name '' must be non-empty", id="empty-name"),
        pytest.param({"a\x00": "x"}, "contain no NUL", id="nul-in-name"),
        pytest.param({"n": 1}, "header 'n' must have a str or bytes value, got int", id="int"),
        pytest.param({"n": None}, "got NoneType", id="none-value"),
        pytest.param([("n", "v")], "headers must be a mapping", id="list-of-pairs"),
        pytest.param("n=v", "headers must be a mapping", id="str"),
    ],
)
def test_invalid_headers_are_rejected(headers: object, message: str) -> None:
    """Bad header names, values or containers raise InvalidHeaderError naming the problem."""
    with pytest.raises(outbox.InvalidHeaderError, match=message):
        sealed(headers=headers)


# --- event ids ----------------------------------------------------------------------------------


def test_event_id_is_a_uuid_version_7_carrying_the_current_time() -> None:
    """new_event_id() is an RFC 9562 UUIDv7 whose 48-bit prefix is the Unix time in ms."""
    before = time.time_ns() // 1_000_000
    event_id = new_event_id()
    after = time.time_ns() // 1_000_000
    assert event_id.version == 7
    assert event_id.variant == uuid.RFC_4122
    assert before <= event_id.int >> 80 <= after


def test_event_ids_are_unique() -> None:
    """Many ids generated at once (mostly in the same millisecond) never collide."""
    ids = [new_event_id() for _ in range(20_000)]
    assert len(set(ids)) == len(ids)


def test_event_ids_sort_in_generation_order_across_milliseconds() -> None:
    """Ids generated in successive milliseconds sort in the order they were made."""
    ids = []
    for _ in range(20):
        ids.append(new_event_id())
        time.sleep(0.002)
    assert sorted(ids) == ids
    assert sorted(str(i) for i in ids) == [str(i) for i in ids]


def test_each_sealed_event_gets_a_fresh_id() -> None:
    """Sealing the same event twice gives two different event ids."""
    assert sealed().event_id != sealed().event_id


# --- schedules (deliver later) ------------------------------------------------------------------

LATER = dt.datetime(2030, 1, 2, 3, 4, 5, tzinfo=dt.timezone(dt.timedelta(hours=-5)))
PAST = dt.datetime(1999, 1, 1, tzinfo=dt.UTC)


def sealed_when(**when: object) -> Envelope:
    """Seal one event with these schedule fields."""
    event = Event("orders", b"{}", **when)  # type: ignore[arg-type]
    return seal(event, settings=outbox.OutboxSettings(), serializer=json_serializer)


def test_an_event_without_a_schedule_seals_to_a_plain_envelope() -> None:
    """Neither field: an Envelope for the outbox table, as before scheduling existed."""
    assert type(sealed_when()) is Envelope
    assert check_schedule(None, None) == (None, None)


@pytest.mark.parametrize(
    ("when", "expected"),
    [
        pytest.param({"deliver_at": LATER}, (LATER, None), id="deliver-at"),
        pytest.param({"deliver_at": PAST}, (PAST, None), id="past"),
        pytest.param(
            {"delay": dt.timedelta(minutes=5)}, (None, dt.timedelta(minutes=5)), id="delay"
        ),
        pytest.param({"delay": dt.timedelta(0)}, (None, dt.timedelta(0)), id="zero-delay"),
    ],
)
def test_a_valid_schedule_seals_to_a_scheduled_envelope(
    when: dict[str, object], expected: tuple[object, object]
) -> None:
    """The envelope keeps the due time or the delay as given; a time in the past is fine."""
    envelope = sealed_when(**when)
    assert isinstance(envelope, ScheduledEnvelope)
    assert (envelope.deliver_at, envelope.delay) == expected
    assert (envelope.topic, envelope.payload) == ("orders", b"{}")


@pytest.mark.parametrize(
    ("when", "message"),
    [
        pytest.param({"deliver_at": dt.datetime(2030, 1, 1)}, "is a naive datetime", id="naive"),
        pytest.param({"delay": dt.timedelta(microseconds=-1)}, "must not be negative", id="neg"),
        pytest.param({"deliver_at": LATER, "delay": dt.timedelta(0)}, "not both", id="both"),
        pytest.param({"deliver_at": 1893456000}, "datetime.datetime, got int", id="epoch"),
        pytest.param({"deliver_at": dt.date(2030, 1, 1)}, "datetime.datetime, got date", id="date"),
        pytest.param({"delay": 5.0}, "datetime.timedelta, got float", id="float-delay"),
        pytest.param({"delay": dt.timedelta.max}, "past the year 9999", id="overflow"),
    ],
)
def test_an_invalid_schedule_is_rejected(when: dict[str, object], message: str) -> None:
    """InvalidScheduleError, naming the problem, before any I/O."""
    with pytest.raises(outbox.InvalidScheduleError, match=message):
        sealed_when(**when)


def test_a_naive_time_is_rejected_with_a_way_out() -> None:
    """The message says how to fix it: a time zone, or delay= instead."""
    with pytest.raises(outbox.InvalidScheduleError) as caught:
        sealed_when(deliver_at=dt.datetime(2030, 1, 1, 12))
    assert "2030-01-01T12:00:00" in str(caught.value)
    assert "time zone" in str(caught.value)
    assert "delay=" in str(caught.value)


def test_event_ids_to_cancel_are_parsed() -> None:
    """A UUID as is, a str in any form uuid.UUID reads; anything else refused."""
    event_id = new_event_id()
    assert parse_event_id(event_id) is event_id
    assert parse_event_id(str(event_id)) == event_id
    assert parse_event_id(str(event_id).upper().replace("-", "")) == event_id
    with pytest.raises(outbox.InvalidScheduleError, match="'nope' is not a UUID"):
        parse_event_id("nope")
    with pytest.raises(outbox.InvalidScheduleError, match="got bytes"):
        parse_event_id(event_id.bytes)


# --- exception hierarchy ------------------------------------------------------------------------


@pytest.mark.parametrize(
    "error",
    [
        outbox.InvalidEventError,
        outbox.InvalidTopicError,
        outbox.InvalidKeyError,
        outbox.InvalidHeaderError,
        outbox.PayloadSerializationError,
        outbox.PayloadTooLargeError,
        outbox.InvalidScheduleError,
    ],
)
def test_invalid_event_errors_are_value_errors_and_outbox_errors(error: type) -> None:
    """Every InvalidEventError subclass can be caught as ValueError and as OutboxError."""
    assert issubclass(error, outbox.InvalidEventError)
    assert issubclass(error, ValueError)
    assert issubclass(error, outbox.OutboxError)


def test_a_raised_invalid_event_is_caught_by_generic_handlers() -> None:
    """A real rejection is caught by `except ValueError` and by `except OutboxError`."""
    with pytest.raises(ValueError, match="must not be empty"):
        sealed("")
    with pytest.raises(outbox.OutboxError, match="must not be empty"):
        sealed("")
