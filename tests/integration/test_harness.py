"""The test servers themselves: a real PostgreSQL and a real Kafka-protocol broker answer."""

from __future__ import annotations

import uuid

import psycopg
import pytest
from confluent_kafka import Consumer, Producer, TopicPartition


def test_each_test_gets_its_own_database_with_the_schema(database_url: str) -> None:
    """The per-test database is a copy of the template: schema present, outbox empty."""
    with psycopg.connect(database_url) as conn:
        name, count = conn.execute(
            "SELECT current_database(), (SELECT count(*) FROM outbox_events)"
        ).fetchone() or (None, None)
    assert name is not None
    assert name.startswith("outbox_test_")
    assert count == 0


@pytest.mark.kafka
def test_broker_round_trips_key_value_and_headers(kafka_bootstrap: str, topic: str) -> None:
    """An idempotent acks=all producer's message comes back with its key, value and headers."""
    marker = uuid.uuid4().bytes
    producer = Producer(
        {"bootstrap.servers": kafka_bootstrap, "enable.idempotence": True, "acks": "all"}
    )
    reports: list[object] = []
    producer.produce(
        topic,
        value=marker,
        key=b"k",
        headers=[("h", b"v")],
        partition=0,
        on_delivery=lambda err, msg: reports.append(err),
    )
    assert producer.flush(30) == 0
    assert reports == [None]

    consumer = Consumer(
        {"bootstrap.servers": kafka_bootstrap, "group.id": topic, "enable.auto.commit": False}
    )
    consumer.assign([TopicPartition(topic, 0, 0)])
    try:
        msg = None
        for _ in range(100):
            msg = consumer.poll(0.5)
            if msg is not None and msg.error() is None:
                break
        assert msg is not None
        assert msg.error() is None
        assert (msg.key(), msg.value(), msg.headers()) == (b"k", marker, [("h", b"v")])
    finally:
        consumer.close()
