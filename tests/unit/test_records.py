"""What a claimed row becomes on Kafka in each ``--record-format`` (pure: no broker needed).

The shapes are checked alone, then through the whole of ``KafkaPublisher.publish`` with a
producer that records what it was handed, failure reports included (a structured record's value
is not the payload, yet its failure report must still find its row).
"""

from __future__ import annotations

import json
from typing import Any

import pytest
from confluent_kafka import KafkaError

from outbox.envelope import EVENT_ID_HEADER
from outbox.errors import ConfigurationError
from outbox_relay import records
from outbox_relay.config import RECORD_FORMATS, RelaySettings
from outbox_relay.kafka import KafkaPublisher
from outbox_relay.outboxes import parse
from outbox_relay.ports import ClaimedRow, Result
from tests.unit.test_key_order_outcomes import ReportedMessage

#: A UUIDv7 written at 2026-12-06T21:30:00.123Z.
EVENT_ID = "01a24d43-843b-7abc-8def-0123456789ab"
TIME = "2026-12-06T21:30:00.123Z"
URL = "postgresql://app@db:5432/shop"


def _row(
    payload: bytes = b'{"order_id":42}',
    headers: dict[str, bytes] | None = None,
    *,
    row_id: int = 1,
    event_id: str = EVENT_ID,
) -> ClaimedRow:
    names, values = zip(*(headers or {}).items(), strict=True) if headers else ((), ())
    return ClaimedRow(row_id, event_id, "orders.placed", b"42", payload, names, values, 0)


def _shape(record_format: str, **settings: Any) -> records.Shape:
    relay = RelaySettings(
        database_url=URL, kafka_bootstrap_servers="k:9092", record_format=record_format, **settings
    )
    shape = records.shaper_of(relay)
    assert shape is not None
    return shape


def test_the_native_format_is_built_inline() -> None:
    """Native records are the publisher's own full-rate path: no shape is called per row."""
    assert records.shaper("native", source="/s", type=None) is None
    assert RelaySettings(database_url=URL, kafka_bootstrap_servers="k").record_format == "native"


def test_the_event_id_milliseconds_give_the_time() -> None:
    """The fixture's id is the UUIDv7 of its time (its first 48 bits, in milliseconds)."""
    from outbox.cloudevents import time_of

    assert time_of(EVENT_ID) == TIME


def test_a_debezium_record_has_the_id_header_then_the_rows_headers() -> None:
    """As Debezium's Outbox Event Router: value as stored, the id in ``id``, no ``event_id``."""
    value, headers = _shape("debezium")(_row(headers={"trace": b"t1"}))
    assert value == b'{"order_id":42}'
    assert headers == [("id", EVENT_ID.encode()), ("trace", b"t1")]


def test_a_binary_cloudevent_defaults_its_source_and_type() -> None:
    """Without the writer's ce_source/ce_type: the outbox's database and the topic."""
    value, headers = _shape("cloudevents-binary")(_row(headers={"trace": b"t1"}))
    assert value == b'{"order_id":42}'
    assert headers == [
        ("ce_specversion", b"1.0"),
        ("ce_id", EVENT_ID.encode()),
        ("ce_source", b"/outbox/shop"),
        ("ce_type", b"orders.placed"),
        ("ce_time", TIME.encode()),
        ("content-type", b"application/json"),
        ("trace", b"t1"),
    ]


def test_the_writers_attributes_win_but_never_the_id() -> None:
    """A row's ce_type, ce_source, ce_subject and content-type are the event's; its ce_id and
    ce_specversion are dropped (the relay sets them)."""
    row = _row(
        headers={
            "ce_type": b"com.example.placed",
            "ce_source": b"/shop/orders",
            "ce_subject": b"42",
            "ce_id": b"forged",
            "ce_specversion": b"0.3",
            "content-type": b"application/vnd.shop+json",
        }
    )
    _, headers = _shape("cloudevents-binary", cloudevents_type="ignored")(row)
    found = dict(headers)
    assert len(found) == len(headers)  # no attribute twice
    assert found["ce_id"] == EVENT_ID.encode()
    assert found["ce_specversion"] == b"1.0"
    assert found["ce_type"] == b"com.example.placed"
    assert found["ce_source"] == b"/shop/orders"
    assert found["ce_subject"] == b"42"
    assert found["content-type"] == b"application/vnd.shop+json"


def test_the_relay_settings_name_the_defaults() -> None:
    """--cloudevents-source and --cloudevents-type for rows that name neither."""
    shape = _shape("cloudevents-binary", cloudevents_source="urn:shop", cloudevents_type="placed")
    found = dict(shape(_row())[1])
    assert (found["ce_source"], found["ce_type"]) == (b"urn:shop", b"placed")


def test_an_id_that_is_not_a_uuid7_has_no_time() -> None:
    """Time is optional in CloudEvents: left out rather than invented."""
    row = _row(event_id="0b9f4a2e-3c1d-4e5f-9a8b-7c6d5e4f3a2b")  # a UUIDv4
    assert "ce_time" not in dict(_shape("cloudevents-binary")(row)[1])


def test_a_structured_cloudevent_embeds_json_data_as_written() -> None:
    """The payload's JSON text is the ``data`` member byte for byte; non-ce headers stay."""
    row = _row(b'{"order_id": 42, "total": "12.50"}', {"ce_subject": b"42", "trace": b"t1"})
    value, headers = _shape("cloudevents-structured")(row)
    assert headers == [
        ("content-type", b"application/cloudevents+json; charset=utf-8"),
        ("trace", b"t1"),
    ]
    assert value.endswith(b',"data":{"order_id": 42, "total": "12.50"}}')
    assert json.loads(value) == {
        "specversion": "1.0",
        "id": EVENT_ID,
        "source": "/outbox/shop",
        "type": "orders.placed",
        "time": TIME,
        "datacontenttype": "application/json",
        "subject": "42",
        "data": {"order_id": 42, "total": "12.50"},
    }


@pytest.mark.parametrize(
    ("payload", "content_type"),
    [
        (b"\x00\x01binary", None),
        (b"not json", None),
        (b"<a/>", b"application/xml"),
        # Python's parser takes NaN; JSON does not: embedded, it would spoil the whole value.
        (b'{"ratio": NaN}', None),
    ],
)
def test_a_structured_cloudevent_carries_other_data_in_base64(
    payload: bytes, content_type: bytes | None
) -> None:
    """A payload that is not JSON (or not said to be) goes as ``data_base64``."""
    headers = {"content-type": content_type} if content_type else None
    value, _ = _shape("cloudevents-structured")(_row(payload, headers))
    document = json.loads(value, parse_constant=_refuse)
    assert "data" not in document
    assert document["data_base64"]
    assert document["datacontenttype"] == ((content_type or b"application/json").decode())


def test_the_source_must_be_a_uri_reference() -> None:
    with pytest.raises(ConfigurationError, match="URI-reference"):
        RelaySettings(database_url=URL, kafka_bootstrap_servers="k", cloudevents_source="a b")


def test_an_unknown_format_is_refused() -> None:
    with pytest.raises(ConfigurationError, match="record_format must be one of"):
        RelaySettings(database_url=URL, kafka_bootstrap_servers="k", record_format="avro")


def test_an_outbox_of_the_list_may_have_its_own_format() -> None:
    """``record_format`` in an [[outbox]] table, as ``retention``; else the relays' own."""
    text = f"""
        [[outbox]]
        name = "a"
        database_url = "{URL}"
        record_format = "cloudevents-structured"
        [[outbox]]
        name = "b"
        database_url = "postgresql://app@db/b"
    """
    base = RelaySettings(database_url=URL, kafka_bootstrap_servers="k", record_format="debezium")
    a, b = parse(text)
    assert a.settings(base).record_format == "cloudevents-structured"
    assert b.settings(base).record_format == "debezium"
    with pytest.raises(ConfigurationError, match="record_format 'avro'"):
        parse(text.replace("cloudevents-structured", "avro"))


class _Producer:
    """Takes every message; at the flush, reports the first one failed (UNKNOWN_TOPIC)."""

    def __init__(self, publisher: KafkaPublisher) -> None:
        self._report = publisher._on_report
        self.produced: list[tuple[str, bytes, bytes | None, Any]] = []
        self.fail_first = False

    def produce(self, topic: str, value: bytes, key: bytes | None, **kwargs: Any) -> None:
        self.produced.append((topic, value, key, kwargs["headers"]))

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        if self.fail_first and self.produced:
            topic, value, key, _ = self.produced[0]
            error = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)
            self._report(error, ReportedMessage(topic, key, value))  # type: ignore[arg-type]
        self.fail_first = False
        return 0


@pytest.mark.parametrize("record_format", RECORD_FORMATS)
def test_publish_sends_each_format_and_finds_the_row_of_a_failure(
    monkeypatch: pytest.MonkeyPatch, record_format: str
) -> None:
    """The whole of ``publish``: the records handed to the producer are the format's, and a
    failure report (carrying the shaped value) fails its own row, no other."""
    producers: list[_Producer] = []

    def new_producer(publisher: KafkaPublisher) -> _Producer:
        producers.append(_Producer(publisher))
        return producers[-1]

    monkeypatch.setattr(KafkaPublisher, "_new_producer", new_producer)
    settings = RelaySettings(
        database_url=URL, kafka_bootstrap_servers="k:9092", record_format=record_format
    )
    publisher = KafkaPublisher(settings)
    rows = [_row(row_id=1), _row(b'{"order_id":43}', row_id=2)._replace(key=b"43")]
    producers[0].fail_first = True
    outcomes = publisher.publish(rows, should_abort=lambda: False)
    assert [o.result for o in outcomes] == [Result.RETRY, Result.DELIVERED]
    (_, value, key, headers), _ = producers[0].produced
    assert key == b"42"
    shape = records.shaper_of(settings)
    if shape is None:
        assert (value, headers) == (rows[0].payload, [(EVENT_ID_HEADER, EVENT_ID.encode())])
    else:
        assert (value, headers) == shape(rows[0])


def _refuse(name: str) -> None:
    raise AssertionError(f"{name} in a structured value")
