"""CloudEvents in the outbox library (pure): the writer's attributes, reading events back, and
which id a consume loop deduplicates on for each kind of record."""

from __future__ import annotations

import json
from collections.abc import Sequence
from typing import Any

import pytest

from outbox import cloudevents
from outbox.consumer import debezium_id_or_position, event_id_or_position
from outbox.errors import InvalidHeaderError

EVENT_ID = "01a24d43-843b-7abc-8def-0123456789ab"  # a UUIDv7 of 2026-12-06T21:30:00.123Z


class Message:
    """What the consume loop reads of a confluent-kafka message."""

    def __init__(self, headers: Sequence[tuple[str, object]] | None, value: bytes = b"{}") -> None:
        self._headers, self._value = headers, value

    def headers(self) -> Sequence[tuple[str, object]] | None:
        return self._headers

    def value(self) -> bytes:
        return self._value

    def topic(self) -> str:
        return "orders"

    def partition(self) -> int:
        return 3

    def offset(self) -> int:
        return 17


def test_attributes_are_the_headers_the_relay_reads() -> None:
    """type and source (and the optional ones) become ce_ headers, the media type content-type."""
    assert cloudevents.attributes(
        type="com.example.placed",
        source="/shop/orders",
        subject="42",
        datacontenttype="application/json",
        extensions={"tenant": "eu1"},
    ) == {
        "ce_type": "com.example.placed",
        "ce_source": "/shop/orders",
        "ce_subject": "42",
        "content-type": "application/json",
        "ce_tenant": "eu1",
    }


@pytest.mark.parametrize(
    ("arguments", "refused"),
    [
        ({"type": "", "source": "/s"}, "type must be a non-empty str"),
        ({"type": "t", "source": "not a uri"}, "URI-reference"),
        ({"type": "t", "source": "/s", "subject": ""}, "subject"),
        ({"type": "t", "source": "/s", "extensions": {"Tenant": "x"}}, "extension name"),
        ({"type": "t", "source": "/s", "extensions": {"id": "x"}}, "extension name"),
    ],
)
def test_attributes_refuse_what_the_spec_refuses(arguments: dict[str, Any], refused: str) -> None:
    with pytest.raises(InvalidHeaderError, match=refused):
        cloudevents.attributes(**arguments)


@pytest.mark.parametrize(
    ("event_id", "expected"),
    [
        (EVENT_ID, "2026-12-06T21:30:00.123Z"),
        ("00000000-0000-7000-8000-000000000000", "1970-01-01T00:00:00.000Z"),
        ("0b9f4a2e-3c1d-4e5f-9a8b-7c6d5e4f3a2b", None),  # v4
        ("not-a-uuid", None),
        ("zzzzzzzz-zzzz-7zzz-8zzz-zzzzzzzzzzzz", None),
    ],
)
def test_the_time_of_an_event_id(event_id: str, expected: str | None) -> None:
    assert cloudevents.time_of(event_id) == expected


def test_from_message_reads_binary_mode() -> None:
    message = Message(
        [
            ("ce_specversion", b"1.0"),
            ("ce_id", EVENT_ID.encode()),
            ("ce_source", b"/shop"),
            ("ce_type", b"placed"),
            ("ce_time", b"2026-12-06T21:30:00.123Z"),
            ("content-type", b"application/json"),
            ("trace", b"t"),
        ],
        b'{"order_id":42}',
    )
    event = cloudevents.from_message(message)
    assert event is not None
    assert (event.id, event.source, event.type) == (EVENT_ID, "/shop", "placed")
    assert event.attributes["datacontenttype"] == "application/json"
    assert event.time is not None
    assert event.time.isoformat() == "2026-12-06T21:30:00.123000+00:00"
    assert event.json() == {"order_id": 42}


def test_from_message_reads_structured_mode() -> None:
    value, headers = cloudevents.structured_value(
        EVENT_ID, b'{"order_id":42}', [("ce_subject", b"42")], source="/shop", type="placed"
    )
    event = cloudevents.from_message(Message(headers, value))
    assert event is not None
    assert (event.id, event.source, event.type) == (EVENT_ID, "/shop", "placed")
    assert event.attributes["subject"] == "42"
    assert event.json() == {"order_id": 42}
    binary, headers = cloudevents.structured_value(
        EVENT_ID, b"\xff\x00", [], source="/shop", type="placed"
    )
    event = cloudevents.from_message(Message(headers, binary))
    assert event is not None
    assert event.data == b"\xff\x00"


def test_a_message_without_a_cloudevent() -> None:
    assert cloudevents.from_message(Message([("event_id", b"e")])) is None
    assert cloudevents.from_message(Message(None)) is None


STRUCTURED = json.dumps({"specversion": "1.0", "id": "s-1", "source": "/s", "type": "t"}).encode()
CE_JSON = ("content-type", b"application/cloudevents+json; charset=utf-8")


@pytest.mark.parametrize(
    ("headers", "value", "expected"),
    [
        ([("event_id", b"native"), ("ce_id", b"ce"), ("id", b"dbz")], b"{}", "native"),
        ([("id", b"dbz"), ("ce_id", b"ce")], b"{}", "ce"),
        ([CE_JSON, ("id", b"dbz")], STRUCTURED, "s-1"),
        # A header named id is not taken by default: another producer's may not be unique.
        ([CE_JSON, ("id", b"dbz")], b"not json", "orders/3/17"),
        ([("content-type", b"application/json"), ("id", b"dbz")], STRUCTURED, "orders/3/17"),
        ([CE_JSON], b"not json", "orders/3/17"),
        ([("event_id", b"")], b"{}", "orders/3/17"),
        (None, b"{}", "orders/3/17"),
    ],
)
def test_the_message_id_of_each_kind_of_record(
    headers: list[tuple[str, bytes]] | None, value: bytes, expected: str
) -> None:
    """event_id, then ce_id, then a structured CloudEvent's id, then the message's position."""
    assert event_id_or_position(Message(headers, value)) == expected  # type: ignore[arg-type]


@pytest.mark.parametrize(
    ("headers", "expected"),
    [
        ([("id", b"dbz"), ("eventType", b"Created")], "dbz"),
        ([("id", b"dbz"), ("event_id", b"native")], "dbz"),
        ([("event_id", b"native")], "native"),
        ([("id", b"")], "orders/3/17"),
        (None, "orders/3/17"),
    ],
)
def test_debeziums_message_id_is_its_id_header_when_asked_for(
    headers: list[tuple[str, bytes]] | None, expected: str
) -> None:
    """debezium_id_or_position, the opt-in for Debezium's records: the id header first."""
    message = Message(headers, b"{}")
    assert debezium_id_or_position(message) == expected  # type: ignore[arg-type]
