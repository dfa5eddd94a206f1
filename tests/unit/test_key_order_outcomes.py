"""A row acknowledged after an earlier row of its key failed is not counted as delivered (pure).

With ``enable.idempotence`` librdkafka may still write a partition's later messages after an
earlier one failed: it times out the oldest queued messages, bumps the producer epoch and sends
the rest (INTRODUCTION.md, "Message timeout considerations"); a permanent error on one request
leaves a gap the same way. The failed row, sent again later, would then land after its
successor. The reports below are what librdkafka hands the delivery callback in that case: one
failure report for the earlier row, none for the later ones (``delivery.report.only.error``).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import Any

import pytest
from confluent_kafka import KafkaError

from outbox_relay.config import RelaySettings
from outbox_relay.kafka import (
    AFTER_UNDELIVERED,
    KafkaPublisher,
    Report,
    failures_by_row,
    hold_back_after_failures,
)
from outbox_relay.ports import ClaimedRow, Outcome, Result

K, L = b"K", b"L"


def _row(row_id: int, key: bytes | None, topic: str = "orders") -> ClaimedRow:
    return ClaimedRow(row_id, f"e{row_id}", topic, key, f"p{row_id}".encode(), (), (), 0)


def _report(row: ClaimedRow, code: int) -> Report:
    """A failure report as the delivery callback gets it: the message's topic, key, payload."""
    return Report(row.topic, row.key, row.payload, KafkaError(code))


def _outcomes(rows: Sequence[ClaimedRow], reports: Sequence[Report]) -> dict[int, Outcome]:
    """What ``publish`` makes of a drained batch's failure reports, by row id."""
    failed, unmatched = failures_by_row(rows, reports)
    assert not unmatched
    outcomes = [failed.get(row.id) or Outcome(row.id, Result.DELIVERED) for row in rows]
    return {o.row_id: o for o in hold_back_after_failures(rows, outcomes)}


# a1, a2, a3 share key K; b1 has key L; n has no key.
A1, B1, A2, A3, N = _row(1, K), _row(2, L), _row(3, K), _row(4, K), _row(5, None)
BATCH = [A1, B1, A2, A3, N]


def test_a_timed_out_row_holds_back_the_later_rows_of_its_key() -> None:
    """a1 timed out in the queue; librdkafka bumped the epoch and wrote a2 and a3."""
    outcomes = _outcomes(BATCH, [_report(A1, KafkaError._MSG_TIMED_OUT)])
    assert {i: o.result for i, o in outcomes.items()} == {
        1: Result.BROKER,
        2: Result.DELIVERED,
        3: Result.NOT_SENT,
        4: Result.NOT_SENT,
        5: Result.DELIVERED,
    }
    assert "_MSG_TIMED_OUT" in outcomes[1].error
    assert outcomes[3].error == outcomes[4].error == AFTER_UNDELIVERED


def test_a_permanent_failure_holds_back_the_later_rows_of_its_key() -> None:
    """a1 is dead-lettered now; a2 and a3 go again in a later batch (after it, if it blocks)."""
    outcomes = _outcomes(BATCH, [_report(A1, KafkaError.MSG_SIZE_TOO_LARGE)])
    results = {i: o.result for i, o in outcomes.items()}
    assert results[1] is Result.PERMANENT
    assert (results[3], results[4]) == (Result.NOT_SENT, Result.NOT_SENT)
    assert (results[2], results[5]) == (Result.DELIVERED, Result.DELIVERED)


def test_a_retried_failure_holds_back_the_later_rows_of_its_key_in_any_topic() -> None:
    """Per-key order spans topics, as the claim's: a1 went to a topic that does not exist."""
    a1 = _row(1, K, topic="gone")
    outcomes = _outcomes([a1, B1, A2, A3, N], [_report(a1, KafkaError.UNKNOWN_TOPIC_OR_PART)])
    results = {i: o.result for i, o in outcomes.items()}
    assert results == {
        1: Result.RETRY,
        2: Result.DELIVERED,
        3: Result.NOT_SENT,
        4: Result.NOT_SENT,
        5: Result.DELIVERED,
    }


def test_a_key_failing_only_on_its_last_row_keeps_its_earlier_rows_delivered() -> None:
    outcomes = _outcomes(BATCH, [_report(A3, KafkaError._MSG_TIMED_OUT)])
    results = {i: o.result for i, o in outcomes.items()}
    assert results == {
        1: Result.DELIVERED,
        2: Result.DELIVERED,
        3: Result.DELIVERED,
        4: Result.BROKER,
        5: Result.DELIVERED,
    }


def test_a_failure_in_the_middle_holds_back_only_what_follows_it() -> None:
    outcomes = _outcomes(BATCH, [_report(A2, KafkaError._MSG_TIMED_OUT)])
    results = {i: o.result for i, o in outcomes.items()}
    assert (results[1], results[3], results[4]) == (
        Result.DELIVERED,
        Result.BROKER,
        Result.NOT_SENT,
    )


def test_a_later_row_that_failed_itself_keeps_its_own_failure() -> None:
    """a2's own error still counts (an attempt, a dead letter): it is not made NOT_SENT."""
    reports = [_report(A1, KafkaError._MSG_TIMED_OUT), _report(A2, KafkaError.MSG_SIZE_TOO_LARGE)]
    results = {i: o.result for i, o in _outcomes(BATCH, reports).items()}
    assert (results[1], results[3], results[4]) == (
        Result.BROKER,
        Result.PERMANENT,
        Result.NOT_SENT,
    )


def test_rows_without_a_key_are_independent() -> None:
    n1, n2 = _row(1, None), _row(2, None)
    outcomes = _outcomes([n1, n2], [_report(n1, KafkaError._MSG_TIMED_OUT)])
    assert [o.result for o in outcomes.values()] == [Result.BROKER, Result.DELIVERED]


def test_outcomes_without_failures_are_returned_as_they_are() -> None:
    outcomes = [Outcome(row.id, Result.DELIVERED) for row in BATCH]
    assert hold_back_after_failures(BATCH, outcomes) == outcomes


class ReportedMessage:
    """What a failure report carries of a message: its topic, key and value (as
    confluent-kafka's ``Message`` gives them); shared with ``test_records``."""

    def __init__(self, topic: str, key: bytes | None, value: bytes) -> None:
        self._topic, self._key, self._value = topic, key, value

    def topic(self) -> str:
        return self._topic

    def key(self) -> bytes | None:
        return self._key

    def value(self) -> bytes:
        return self._value


class _Producer:
    """Stands in for confluent-kafka's: takes every message, and at the flush serves a failure
    report for those named in ``fail`` (as librdkafka does from ``flush``), none for the rest."""

    def __init__(self, report: Callable[[KafkaError, Any], None], fail: dict[int, int]) -> None:
        self._report, self._fail = report, fail
        self.produced: list[ReportedMessage] = []

    def produce(self, topic: str, value: bytes, key: bytes | None, **_: Any) -> None:
        self.produced.append(ReportedMessage(topic, key, value))

    def poll(self, _timeout: float) -> int:
        return 0

    def flush(self, _timeout: float) -> int:
        for message in self.produced:
            code = self._fail.get(int(message.value()[1:]))
            if code is not None:
                self._report(KafkaError(code), message)
        self.produced = []
        return 0


@pytest.mark.parametrize(
    ("fail", "expected"),
    [
        ({}, [Result.DELIVERED] * 5),
        (
            {1: KafkaError._MSG_TIMED_OUT},
            [Result.BROKER, Result.DELIVERED, Result.NOT_SENT, Result.NOT_SENT, Result.DELIVERED],
        ),
    ],
)
def test_publish_holds_back_rows_acknowledged_after_a_failure_of_their_key(
    monkeypatch: pytest.MonkeyPatch, fail: dict[int, int], expected: list[Result]
) -> None:
    """The whole of ``publish``, with the reports coming through the delivery callback."""
    producers: list[_Producer] = []

    def new_producer(publisher: KafkaPublisher) -> _Producer:
        producers.append(_Producer(publisher._on_report, fail))
        return producers[-1]

    monkeypatch.setattr(KafkaPublisher, "_new_producer", new_producer)
    publisher = KafkaPublisher(
        RelaySettings(database_url="postgresql://unused", kafka_bootstrap_servers="unused:9092")
    )
    outcomes = publisher.publish(BATCH, should_abort=lambda: False)
    assert [o.row_id for o in outcomes] == [row.id for row in BATCH]
    assert [o.result for o in outcomes] == expected
