"""``outbox.debezium``: events shaped as Debezium's Outbox Event Router shapes them, checked
before any I/O (the bytes themselves are proven against Debezium in
``tests/acceptance/test_debezium_golden.py``)."""

from __future__ import annotations

import pytest

from outbox import debezium
from outbox.errors import (
    InvalidEventError,
    InvalidHeaderError,
    InvalidTopicError,
    PayloadSerializationError,
    PayloadTooLargeError,
)
from outbox.settings import OutboxSettings

SETTINGS = OutboxSettings()


def event(**fields: object) -> debezium.DebeziumEvent:
    values: dict[str, object] = {
        "aggregate_type": "order",
        "aggregate_id": "42",
        "event_type": "OrderPlaced",
        "payload": {"total": "12.50"},
    }
    return debezium.DebeziumEvent(**(values | fields))  # type: ignore[arg-type]


def test_the_row_is_the_routers_record() -> None:
    """Topic outbox.event.<aggregate type>, key the aggregate id, header eventType."""
    sealed = debezium.seal_event(event(aggregate_id="kunde-ü"), SETTINGS)
    assert sealed.topic == "outbox.event.order"
    assert sealed.key == "kunde-ü".encode()
    assert sealed.headers == (("eventType", b"OrderPlaced"),)
    assert sealed.payload == b'{"total":"12.50"}'  # normalized by PostgreSQL in the INSERT


def test_a_topic_replaces_the_default_route_and_headers_follow_the_type() -> None:
    """A custom route.topic.replacement is given as the topic; further placements follow."""
    sealed = debezium.seal_event(
        event(topic="orders", headers={"tenant": "t1", "trace": b"\x01"}), SETTINGS
    )
    assert sealed.topic == "orders"
    assert sealed.headers == (("eventType", b"OrderPlaced"), ("tenant", b"t1"), ("trace", b"\x01"))


@pytest.mark.parametrize("name", ["id", "eventType"])
def test_the_routers_own_headers_are_reserved(name: str) -> None:
    """``id`` carries the event id and ``eventType`` the type: a header cannot replace them."""
    with pytest.raises(InvalidHeaderError, match="reserved"):
        debezium.seal_event(event(headers={name: "x"}), SETTINGS)


@pytest.mark.parametrize("aggregate_type", ["", "a b", "ordre/1", "é", "x" * 240])
def test_an_aggregate_type_must_make_a_topic(aggregate_type: str) -> None:
    """The aggregate type names the topic: Kafka's rules apply to outbox.event.<type>."""
    with pytest.raises(InvalidEventError, match="aggregate_type"):
        debezium.topic_of(aggregate_type)


def test_a_bad_topic_error_is_a_topic_error() -> None:
    """The error keeps its class, so callers can catch InvalidTopicError."""
    with pytest.raises(InvalidTopicError):
        debezium.topic_of("a b")


@pytest.mark.parametrize(
    ("field", "value"),
    [
        ("aggregate_id", 42),
        ("aggregate_id", ""),
        ("aggregate_id", "x" * 256),
        ("event_type", None),
        ("event_type", "a\x00b"),
        ("aggregate_type", b"order"),
    ],
)
def test_fields_fit_debeziums_table(field: str, value: object) -> None:
    """Non-empty text of at most 255 characters, without NUL (``varchar(255)``): what could
    go back through Debezium's table."""
    with pytest.raises(InvalidEventError, match=field):
        debezium.seal_event(event(**{field: value}), SETTINGS)


def test_255_characters_fit() -> None:
    """The limit is Debezium's own, inclusive."""
    sealed = debezium.seal_event(event(aggregate_id="x" * 255), SETTINGS)
    assert sealed.key == b"x" * 255


@pytest.mark.parametrize(
    "payload",
    ['{"a": 1}', b'{"a": 1}', "[1, 2]", '"text"', "null", {"a": [1, 2.5]}, [], 3, None],
)
def test_payloads_are_json_objects_or_json_text(payload: object) -> None:
    """Objects go through the default serializer; text and bytes as written."""
    debezium.seal_event(event(payload=payload), SETTINGS)


@pytest.mark.parametrize(
    ("payload", "reason"),
    [
        ("{'a': 1}", "not JSON"),
        ("", "not JSON"),
        (b"\xff", "not JSON"),
        ('{"a": NaN}', "not JSON"),
        ("Infinity", "not JSON"),
        ('{"a": "\\u0000"}', "u0000"),
        ({"a\x00": 1}, "u0000"),
        ('"\\ud800"', "surrogate"),
        ("1e200000", "numeric"),
        ("1e-20000", "numeric"),
        (float("nan"), "serialize"),
        (object(), "serialize"),
    ],
)
def test_what_jsonb_refuses_is_refused_before_any_io(payload: object, reason: str) -> None:
    """A payload PostgreSQL's jsonb would refuse fails here, naming why, so the caller's
    transaction is not aborted by the INSERT."""
    with pytest.raises(PayloadSerializationError, match=reason):
        debezium.seal_event(event(payload=payload), SETTINGS)


def test_numbers_as_long_as_numeric_takes_are_taken() -> None:
    """jsonb stores numbers as numeric (131,072 digits before the point): an integer longer
    than Python's int() parses by default still goes through."""
    sealed = debezium.seal_event(event(payload="9" * 5000), SETTINGS)
    assert sealed.payload == b"9" * 5000


def test_the_size_limit_applies() -> None:
    """As for every event: the settings' max_payload_bytes."""
    with pytest.raises(PayloadTooLargeError):
        debezium.seal_event(
            event(payload="[" + "1," * 20 + "1]"), OutboxSettings(max_payload_bytes=10)
        )


def test_the_insert_normalizes_in_postgresql_and_names_tables_through_settings() -> None:
    """The payload is cast to jsonb and printed back by PostgreSQL; the table is the
    settings' own."""
    sql = debezium.insert_sql(OutboxSettings(schema="app", table_prefix="x_"), 2)
    assert sql.startswith('INSERT INTO "app"."x_events" (event_id, topic, key, payload,')
    assert sql.count("CAST(convert_from(%s, 'UTF8') AS jsonb)::text") == 2
    assert sql.count("%s") == 12


def test_a_non_event_is_refused() -> None:
    """add_many takes DebeziumEvent values only (not outbox.Event)."""
    with pytest.raises(InvalidEventError, match="DebeziumEvent"):
        debezium.seal_event({"aggregate_type": "order"}, SETTINGS)  # type: ignore[arg-type]
