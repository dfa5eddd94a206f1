"""What a failed delivery does to its row: error classification and the failure plan (pure)."""

from __future__ import annotations

import pytest
from confluent_kafka import KafkaError

from outbox_relay.claims import Failure, plan_failures
from outbox_relay.kafka import classify, describe
from outbox_relay.ports import ClaimedRow, Outcome, Result


def _row(row_id: int, attempts: int = 0, key: bytes | None = b"k") -> ClaimedRow:
    return ClaimedRow(
        id=row_id,
        event_id=f"00000000-0000-7000-8000-{row_id:012d}",
        topic="orders",
        key=key,
        payload=b"{}",
        header_names=(),
        header_values=(),
        attempts=attempts,
    )


class RecordingDelay:
    """delay_for that records which attempt numbers it was asked about."""

    def __init__(self) -> None:
        self.asked: list[int] = []

    def __call__(self, attempt: int) -> float:
        self.asked.append(attempt)
        return 100.0 + attempt


def _plan(
    rows: list[ClaimedRow], outcomes: list[Outcome], *, max_attempts: int = 5
) -> tuple[list[Failure], RecordingDelay]:
    delay = RecordingDelay()
    return plan_failures(rows, outcomes, max_attempts=max_attempts, delay_for=delay), delay


# plan_failures


@pytest.mark.parametrize("result", [Result.DELIVERED, Result.BROKER, Result.NOT_SENT])
def test_outcomes_that_are_not_the_rows_fault_record_nothing(result: Result) -> None:
    """Delivered, broker-down and not-sent rows count no attempt and get no delay."""
    failures, delay = _plan([_row(1, attempts=4)], [Outcome(1, result, "whatever")])
    assert failures == []
    assert delay.asked == []


def test_a_retriable_failure_counts_an_attempt_with_its_backoff() -> None:
    """RETRY: not dead yet, delay from delay_for(attempts before this one), error kept."""
    failures, delay = _plan(
        [_row(1, attempts=0), _row(2, attempts=2)],
        [
            Outcome(1, Result.RETRY, "UNKNOWN_TOPIC_OR_PART: nope"),
            Outcome(2, Result.RETRY, "again"),
        ],
        max_attempts=5,
    )
    assert failures == [
        Failure(1, "UNKNOWN_TOPIC_OR_PART: nope", 100.0, dead=False),
        Failure(2, "again", 102.0, dead=False),
    ]
    assert delay.asked == [0, 2]


def test_a_retriable_failure_is_dead_when_attempts_reach_max() -> None:
    """The max_attempts-th failed attempt dead-letters the row; one fewer does not."""
    failures, _ = _plan(
        [_row(1, attempts=3), _row(2, attempts=4), _row(3, attempts=9)],
        [Outcome(i, Result.RETRY, "e") for i in (1, 2, 3)],
        max_attempts=5,
    )
    assert [(f.row_id, f.dead) for f in failures] == [(1, False), (2, True), (3, True)]


def test_max_attempts_one_dead_letters_on_the_first_failure() -> None:
    """With max_attempts=1 there is no retry at all."""
    failures, _ = _plan([_row(1)], [Outcome(1, Result.RETRY, "e")], max_attempts=1)
    assert failures[0].dead


def test_a_permanent_failure_is_dead_at_once() -> None:
    """PERMANENT: dead-lettered on its first attempt, with its error."""
    failures, _ = _plan(
        [_row(1, attempts=0)],
        [Outcome(1, Result.PERMANENT, "MSG_SIZE_TOO_LARGE: too big")],
        max_attempts=10,
    )
    assert len(failures) == 1
    assert failures[0].row_id == 1
    assert failures[0].dead
    assert failures[0].error == "MSG_SIZE_TOO_LARGE: too big"


def test_a_mixed_batch_plans_only_the_rows_failures_in_outcome_order() -> None:
    """Only RETRY and PERMANENT rows appear, each once, in the order of the outcomes."""
    rows = [_row(i) for i in range(1, 7)]
    outcomes = [
        Outcome(1, Result.DELIVERED),
        Outcome(2, Result.PERMANENT, "p"),
        Outcome(3, Result.BROKER, "b"),
        Outcome(4, Result.RETRY, "r"),
        Outcome(5, Result.NOT_SENT, "n"),
        Outcome(6, Result.DELIVERED),
    ]
    failures, _ = _plan(rows, outcomes)
    assert [(f.row_id, f.error, f.dead) for f in failures] == [(2, "p", True), (4, "r", False)]


# classify


@pytest.mark.parametrize(
    "code",
    [
        KafkaError._MSG_TIMED_OUT,
        KafkaError._TRANSPORT,
        KafkaError._ALL_BROKERS_DOWN,
        KafkaError._TIMED_OUT,
        KafkaError._QUEUE_FULL,
        KafkaError.REQUEST_TIMED_OUT,
        KafkaError.NOT_ENOUGH_REPLICAS,
        KafkaError.LEADER_NOT_AVAILABLE,
        KafkaError.NOT_LEADER_FOR_PARTITION,
        KafkaError.NETWORK_EXCEPTION,
    ],
)
def test_broker_and_network_errors_are_not_the_rows_fault(code: int) -> None:
    """Timeouts, transport errors and leader changes classify as BROKER."""
    assert classify(KafkaError(code)) is Result.BROKER


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.PRODUCER_FENCED,
        KafkaError.INVALID_PRODUCER_EPOCH,
        KafkaError.UNKNOWN_PRODUCER_ID,
        KafkaError.OUT_OF_ORDER_SEQUENCE_NUMBER,
    ],
)
def test_a_broken_producer_session_is_not_the_rows_fault(code: int) -> None:
    """Fenced or out-of-sequence producer: BROKER, so healthy rows are never dead-lettered."""
    assert classify(KafkaError(code)) is Result.BROKER


def test_a_fatal_error_is_a_broker_error_whatever_its_code() -> None:
    """A fatal producer error says nothing about the row: BROKER."""
    assert classify(KafkaError(KafkaError.UNKNOWN_TOPIC_OR_PART, fatal=True)) is Result.BROKER


@pytest.mark.parametrize(
    "code",
    [
        KafkaError.MSG_SIZE_TOO_LARGE,
        KafkaError.RECORD_LIST_TOO_LARGE,
        KafkaError.TOPIC_EXCEPTION,
        KafkaError.INVALID_RECORD,
    ],
)
def test_errors_a_retry_cannot_fix_are_permanent(code: int) -> None:
    """Too large, invalid topic or record: PERMANENT."""
    assert classify(KafkaError(code)) is Result.PERMANENT


@pytest.mark.parametrize(
    "code",
    [KafkaError.UNKNOWN_TOPIC_OR_PART, KafkaError._UNKNOWN_TOPIC, KafkaError._UNKNOWN_PARTITION],
)
def test_unknown_topics_are_retried(code: int) -> None:
    """A topic that does not exist (yet) is a row error worth retrying: RETRY."""
    assert classify(KafkaError(code)) is Result.RETRY


def test_describe_names_the_error() -> None:
    """The recorded error text starts with the error's name."""
    text = describe(KafkaError(KafkaError.MSG_SIZE_TOO_LARGE, "too big"))
    assert text.startswith("MSG_SIZE_TOO_LARGE")
    assert "too big" in text
