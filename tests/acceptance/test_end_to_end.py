"""End to end: outbox.add -> relay (SIGKILLed once mid-stream) -> Kafka -> ConsumeLoop with
dedup: exactly one side effect per event, whatever Kafka delivered twice.
"""

from __future__ import annotations

import signal
import threading
import time
from collections.abc import Callable
from pathlib import Path

import psycopg
import pytest
import sqlalchemy as sa
from confluent_kafka import Message
from sqlalchemy.orm import Session, sessionmaker

import outbox
from outbox.consumer import ConsumeLoop, ConsumerSettings, event_id_or_position
from outbox.testing import log_events
from tests.acceptance.relay_harness import (
    create_topic,
    read_topic,
    run_relay,
    start_relay,
    unpublished,
    wait_until,
)

pytestmark = pytest.mark.kafka

EVENTS = 10_000
PER_TRANSACTION = 100
KEYS = 50
#: Tansu answers a group join after about half the session timeout (23 s with the default 45 s).
KAFKA_CONFIG = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


def write_with_add(engine: sa.Engine, topic: str) -> list[str]:
    """EVENTS events, PER_TRANSACTION per transaction, each written with outbox.add next to a
    business row; returns the event ids in order."""
    ids: list[str] = []
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE orders (n int PRIMARY KEY)")
    for start in range(0, EVENTS, PER_TRANSACTION):
        with Session(engine) as session, session.begin():
            for n in range(start, start + PER_TRANSACTION):
                session.execute(sa.text("INSERT INTO orders VALUES (:n)"), {"n": n})
                event_id = outbox.add(session, topic, {"n": n}, key=f"key-{n % KEYS}")
                ids.append(str(event_id))
    return ids


def effects(database_url: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM effects").fetchone()
    assert row is not None
    return int(row[0])


def record(session: Session, message: Message) -> None:
    """The side effect: one row per event in ``effects``."""
    value = message.value()
    assert value is not None
    session.execute(
        sa.text("INSERT INTO effects VALUES (:id, :payload)"),
        {"id": event_id_or_position(message), "payload": value.decode()},
    )


def test_exactly_one_side_effect_per_event_through_a_relay_crash(
    database_url: str,
    engine: sa.Engine,
    kafka_bootstrap: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """10,000 events written with outbox.add; the relay is SIGKILLed mid-stream and restarted;
    a consumer with dedup makes exactly one side effect per event."""
    topic = create_topic(kafka_bootstrap)
    ids = write_with_add(engine, topic)
    assert len(set(ids)) == EVENTS
    with engine.begin() as conn:
        conn.exec_driver_sql("CREATE TABLE effects (event_id text NOT NULL, payload text NOT NULL)")

    settings = ConsumerSettings(
        "e2e-billing",
        [topic],
        kafka_bootstrap,
        batch_size=100,
        backoff_base=0.01,
        backoff_cap=0.1,
        poll_timeout=0.2,
        kafka_config=KAFKA_CONFIG,
    )
    loop = ConsumeLoop(settings, record, sessionmaker(engine))
    errors: list[BaseException] = []

    def consume() -> None:
        try:
            loop.run(handle_signals=False)
        except BaseException as exc:  # reported by the assertions below
            errors.append(exc)

    consumer = threading.Thread(target=consume, daemon=True)
    consumer.start()
    try:
        # The relay, killed once while some but not all events are published.
        relay = start_relay(
            database_url, kafka_bootstrap, "--batch-size", "200", log=tmp_path / "killed.log"
        )
        try:
            deadline = time.monotonic() + 60
            while not 0 < unpublished(database_url) < EVENTS:
                assert unpublished(database_url) > 0, "the relay drained everything before the kill"
                assert relay.poll() is None, f"the relay exited early with {relay.returncode}"
                assert time.monotonic() < deadline, "the relay published nothing within 60 s"
                time.sleep(0.01)
        finally:
            relay.kill()
        assert relay.wait(timeout=10) == -signal.SIGKILL
        left_at_kill = unpublished(database_url)
        assert 0 < left_at_kill < EVENTS, "the kill must come mid-stream"

        result = run_relay(
            database_url, kafka_bootstrap, "--batch-size", "200", "--exit-when-idle", timeout=120
        )
        assert result.returncode == 0, result.stderr[-3000:]
        assert unpublished(database_url) == 0
        # The restarted relay's own account of its drain: every row left at the kill.
        [drained] = log_events(result.stderr, "relay.drained")
        assert drained["published"] == left_at_kill
        assert drained["seconds"] > 0
        assert drained["events_per_s"] == round(left_at_kill / drained["seconds"])

        received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids), timeout=60)
        delivered = len(received)
        assert {r.event_id for r in received} == set(ids), "every event reached Kafka"

        # The consumer has seen everything Kafka holds (at least once) when processed plus
        # skipped reaches the number of messages on the topic.
        wait_until(
            lambda: loop.stats.processed + loop.stats.duplicates >= delivered or bool(errors),
            timeout=120,
            interval=0.2,
        )
        time.sleep(1.0)  # room for anything unexpected to show
    finally:
        loop.stop()
        consumer.join(timeout=30)
    assert not consumer.is_alive(), "the consumer did not stop"
    assert errors == []

    stats = loop.stats
    kafka_duplicates = delivered - EVENTS
    print(
        f"\nend to end: {EVENTS} events, {left_at_kill} unpublished at the relay's SIGKILL; "
        f"Kafka delivered {delivered} messages ({kafka_duplicates} duplicates); consumer "
        f"processed {stats.processed}, skipped {stats.duplicates} duplicates, "
        f"{effects(database_url)} side effects"
    )
    record_property("rows_left_at_kill", left_at_kill)
    record_property("kafka_messages", delivered)
    record_property("kafka_duplicates", kafka_duplicates)
    record_property("consumer_processed", stats.processed)
    record_property("consumer_duplicates", stats.duplicates)

    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT event_id FROM effects").fetchall()
        by_payload = conn.execute("SELECT count(DISTINCT payload) FROM effects").fetchone()
    assert len(rows) == EVENTS, "exactly one side effect per event"
    assert sorted(r[0] for r in rows) == sorted(ids)
    assert by_payload == (EVENTS,)
    assert stats.processed == EVENTS
    assert stats.duplicates >= kafka_duplicates, "every duplicate on Kafka was skipped"
    assert (stats.failures, stats.dead_lettered) == (0, 0)
