"""KafkaPublisher against a real broker: which rows count as delivered.

The producer reports failures only (``delivery.report.only.error``); a row counts as delivered
when the producer's queue drained with no failure reported for it. These tests pin that a failed
row is never taken for a delivered one, whatever else is in the batch.
"""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox_relay.config import RelaySettings
from outbox_relay.kafka import KafkaPublisher
from outbox_relay.ports import ClaimedRow, Result
from tests.acceptance.relay_harness import broker_behind_proxy, create_topic, read_topic

pytestmark = pytest.mark.kafka


def row(row_id: int, topic: str, key: bytes | None = b"k") -> ClaimedRow:
    event_id = f"00000000-0000-7000-8000-{row_id:012d}"
    return ClaimedRow(row_id, event_id, topic, key, b"{}", (), (), 0)


def publisher(bootstrap: str, **config: str) -> KafkaPublisher:
    return KafkaPublisher(
        RelaySettings(
            database_url="postgresql://unused",
            kafka_bootstrap_servers=bootstrap,
            delivery_timeout=10,
            kafka_config={"allow.auto.create.topics": "false", **config},
        )
    )


def test_every_row_of_a_good_batch_is_delivered(kafka_bootstrap: str, topic: str) -> None:
    rows = [row(i, topic, key=f"k{i % 3}".encode()) for i in range(1, 301)]
    outcomes = publisher(kafka_bootstrap).publish(rows, should_abort=lambda: False)
    assert [o.row_id for o in outcomes] == [r.id for r in rows]
    assert {o.result for o in outcomes} == {Result.DELIVERED}


def test_a_row_for_a_missing_topic_fails_and_only_that_row(
    kafka_bootstrap: str, topic: str
) -> None:
    """The failure report reaches its own row; the rows around it are delivered."""
    rows = [row(1, topic, b"a"), row(2, "no-such-topic-here", b"b"), row(3, topic, b"c")]
    outcomes = publisher(kafka_bootstrap).publish(rows, should_abort=lambda: False)
    results = {o.row_id: o.result for o in outcomes}
    assert results == {1: Result.DELIVERED, 2: Result.RETRY, 3: Result.DELIVERED}
    assert "UNKNOWN_TOPIC" in next(o.error for o in outcomes if o.row_id == 2)


def test_rows_abandoned_before_kafka_answered_are_not_delivered(
    kafka_bootstrap: str, topic: str
) -> None:
    """Aborted mid-flush (the grace period ran out): nothing without an answer counts."""
    rows = [row(1, topic), row(2, "no-such-topic-either")]
    outcomes = publisher(kafka_bootstrap).publish(rows, should_abort=lambda: True)
    assert all(o.result is not Result.DELIVERED for o in outcomes if o.row_id == 2)
    assert all(o.result in (Result.DELIVERED, Result.NOT_SENT) for o in outcomes)


def test_a_settled_publisher_never_delivers_what_it_had_not_sent(tmp_path: Path) -> None:
    """The broker cut off, a batch abandoned in the producer's queue: ``settle`` drops it, so
    once the broker is back nothing of it arrives (without ``settle`` librdkafka would deliver
    it until the delivery timeout, after whatever another relay sent meanwhile)."""
    with broker_behind_proxy(tmp_path) as (bootstrap, proxy):
        topic = create_topic(bootstrap)
        cut_off = publisher(bootstrap)
        [first] = cut_off.publish([row(1, topic)], should_abort=lambda: False)  # connected
        assert first.result is Result.DELIVERED
        proxy.cut()
        rows = [row(i, topic) for i in range(3, 13)]
        outcomes = cut_off.publish(rows, should_abort=lambda: True)
        assert {o.result for o in outcomes} == {Result.NOT_SENT}
        assert cut_off.settle(5.0)
        proxy.restore()
        late = publisher(bootstrap)
        [last] = late.publish([row(99, topic)], should_abort=lambda: False)
        assert last.result is Result.DELIVERED
        received = read_topic(bootstrap, topic, expect_ids={row(99, topic).event_id})
        assert sorted(int(r.event_id[-12:]) for r in received) == [1, 99]
