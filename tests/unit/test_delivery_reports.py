"""Matching librdkafka's failure reports to the rows of a batch (pure: no broker needed).

A report carries the failed message's topic, key and payload; the row it belongs to must take
the failure, no other row may be counted as delivered on a report that matches nothing.
"""

from __future__ import annotations

from confluent_kafka import KafkaError

from outbox_relay.kafka import Report, failures_by_row
from outbox_relay.ports import ClaimedRow, Result


def _row(
    row_id: int, topic: str = "orders", key: bytes | None = b"k", payload: bytes = b"{}"
) -> ClaimedRow:
    return ClaimedRow(row_id, f"e{row_id}", topic, key, payload, (), (), 0)


UNKNOWN_TOPIC = KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART)


def test_no_reports_no_failures() -> None:
    assert failures_by_row([_row(1), _row(2)], []) == ({}, False)


def test_a_report_fails_exactly_its_row() -> None:
    rows = [_row(1, payload=b"a"), _row(2, topic="gone", payload=b"b"), _row(3, key=None)]
    failed, unmatched = failures_by_row(rows, [Report("gone", b"k", b"b", UNKNOWN_TOPIC)])
    assert not unmatched
    assert list(failed) == [2]
    assert failed[2].result is Result.RETRY
    assert "UNKNOWN_TOPIC" in failed[2].error


def test_a_keyless_row_is_matched_too() -> None:
    rows = [_row(1, key=None, payload=b"a"), _row(2, key=b"x", payload=b"a")]
    failed, unmatched = failures_by_row(rows, [Report("orders", None, b"a", UNKNOWN_TOPIC)])
    assert (list(failed), unmatched) == ([1], False)


def test_rows_alike_in_topic_key_and_payload_all_take_the_failure() -> None:
    """The report cannot tell them apart: both are sent again rather than one counted sent."""
    rows = [_row(1), _row(2), _row(3, payload=b"other")]
    failed, unmatched = failures_by_row(rows, [Report("orders", b"k", b"{}", UNKNOWN_TOPIC)])
    assert (sorted(failed), unmatched) == ([1, 2], False)


def test_a_report_that_matches_no_row_is_flagged() -> None:
    """A late report of an earlier batch, or one not understood: nothing may count as sent."""
    failed, unmatched = failures_by_row([_row(1)], [Report("orders", b"k", b"else", UNKNOWN_TOPIC)])
    assert (failed, unmatched) == ({}, True)
    failed, unmatched = failures_by_row([_row(1)], [Report(None, None, None, UNKNOWN_TOPIC)])
    assert (failed, unmatched) == ({}, True)
