"""CloudEvents with the CloudEvents SDK on the other side (``cloudevents`` on PyPI):

* a relay run with ``--record-format cloudevents-binary`` and ``cloudevents-structured`` publishes
  events that the SDK's Kafka binding reads back with the id, source, type, time and data that
  were written;
* events the SDK wrote (binary and structured, each produced twice) are handled once by a consume
  loop, deduplicated by their CloudEvents id.
"""

from __future__ import annotations

import datetime as dt
import threading
import time
import uuid
from typing import Any

import psycopg
import pytest
import sqlalchemy as sa
from cloudevents.core.bindings import kafka as ce_kafka
from cloudevents.core.formats.json import JSONFormat
from cloudevents.core.v1.event import CloudEvent
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox import cloudevents, urls
from outbox.consumer import ConsumeLoop, ConsumerSettings, header_pairs
from tests.acceptance.relay_harness import create_topic, run_relay

pytestmark = pytest.mark.kafka

#: Tansu answers a group join after about half the session timeout.
KAFKA_CONFIG = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}
ATTRIBUTES = cloudevents.attributes(
    type="com.example.order.placed", source="/shop/orders", subject="42"
)


def write(database_url: str, topic: str) -> list[tuple[str, dict[str, Any], dict[str, str]]]:
    """Three events: two with the writer's attributes, one with none (the relay's defaults)."""
    written = [({"order_id": 1}, ATTRIBUTES), ({"order_id": 2}, {}), ({"order_id": 3}, ATTRIBUTES)]
    events = [outbox.Event(topic, data, key="k", headers=h or None) for data, h in written]
    with psycopg.connect(database_url) as conn:
        ids = outbox.add_many(conn, events)
    return [(str(i), data, h) for i, (data, h) in zip(ids, written, strict=True)]


def read(bootstrap: str, topic: str, count: int) -> list[ce_kafka.KafkaMessage]:
    """The topic's first ``count`` messages (partitions assigned), as the SDK takes them."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic})
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    found: list[ce_kafka.KafkaMessage] = []
    deadline = time.monotonic() + 30
    try:
        while len(found) < count and time.monotonic() < deadline:
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                headers = {n: _bytes(v) for n, v in header_pairs(msg)}
                found.append(ce_kafka.KafkaMessage(headers, msg.key(), msg.value() or b""))
    finally:
        consumer.close()
    assert len(found) == count
    return found


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else value or b""


@pytest.mark.parametrize(
    ("record_format", "from_kafka"),
    [
        ("cloudevents-binary", ce_kafka.from_binary),
        ("cloudevents-structured", ce_kafka.from_structured),
    ],
)
def test_the_sdk_reads_what_the_relay_publishes(
    database_url: str, kafka_bootstrap: str, record_format: str, from_kafka: Any
) -> None:
    """id, source, type, time and data as written; the relay's defaults where the writer set
    no attributes (the topic as type, ``/outbox/<database>`` as source)."""
    topic = create_topic(kafka_bootstrap, partitions=1)
    written = write(database_url, topic)
    result = run_relay(
        database_url, kafka_bootstrap, "--record-format", record_format, "--exit-when-idle"
    )
    assert result.returncode == 0, result.stderr[-3000:]
    default_source = f"/outbox/{urls.parse(database_url).database}"
    for message, (event_id, data, attributes) in zip(
        read(kafka_bootstrap, topic, len(written)), written, strict=True
    ):
        event = from_kafka(message, JSONFormat())
        assert event.get_id() == event_id
        assert event.get_specversion() == "1.0"
        assert event.get_source() == attributes.get("ce_source", default_source)
        assert event.get_type() == attributes.get("ce_type", topic)
        assert event.get_subject() == attributes.get("ce_subject")
        millis = uuid.UUID(event_id).int >> 80
        assert event.get_time() == dt.datetime.fromtimestamp(millis / 1000, dt.UTC)
        assert event.get_datacontenttype() == "application/json"
        assert event.get_data() == data


def test_a_consume_loop_handles_each_sdk_event_once(
    engine: sa.Engine, kafka_bootstrap: str
) -> None:
    """The same CloudEvent produced twice, in each mode: the handler runs once for each, and
    sees it through ``cloudevents.from_message``."""
    topic = create_topic(kafka_bootstrap, partitions=1)
    events = [
        CloudEvent({"type": "t.binary", "source": "/sdk", "id": str(uuid.uuid4())}, {"n": 1}),
        CloudEvent({"type": "t.structured", "source": "/sdk", "id": str(uuid.uuid4())}, {"n": 2}),
    ]
    messages = [ce_kafka.to_binary(events[0], JSONFormat())]
    messages.append(ce_kafka.to_structured(events[1], JSONFormat()))
    producer = Producer({"bootstrap.servers": kafka_bootstrap})
    for message in [*messages, *messages]:
        producer.produce(topic, message.value, message.key, headers=list(message.headers.items()))
    assert producer.flush(30) == 0

    handled: list[tuple[str, str, Any]] = []

    def handle(session: Session, message: Message) -> None:
        event = cloudevents.from_message(message)
        assert event is not None
        handled.append((event.id, event.type, event.json()))

    settings = ConsumerSettings("ce-billing", [topic], kafka_bootstrap, kafka_config=KAFKA_CONFIG)
    loop = ConsumeLoop(settings, handle, sessionmaker(engine))
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False}, daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 40
        while loop.stats.processed + loop.stats.duplicates < 4:
            assert time.monotonic() < deadline, f"4 messages not consumed in 40 s: {handled}"
            time.sleep(0.1)
    finally:
        loop.stop()
        thread.join(timeout=30)
    assert handled == [
        (events[0].get_id(), "t.binary", {"n": 1}),
        (events[1].get_id(), "t.structured", {"n": 2}),
    ]
    assert loop.stats.duplicates == 2
