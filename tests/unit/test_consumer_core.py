"""outbox.consumer_core without servers: the consume loop's decisions, driven by a fake shell
that answers the core's commands from memory (batches from a list, a dedup "table" that keeps
a transaction's claims only when it commits, a handler that fails on chosen payloads).

What the sync and async loops do with a real broker and database is in
tests/integration/test_consumer*.py; here each decision is checked alone.
"""

from __future__ import annotations

from collections.abc import Generator
from typing import Any

import pytest
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry
from structlog.testing import capture_logs

from outbox.consumer import ConsumerSettings, ConsumerStopped
from outbox.consumer_core import (
    ClaimMany,
    ClaimOne,
    Command,
    Commit,
    Committed,
    Consume,
    ConsumeCore,
    DeadLetter,
    Handle,
    InTransaction,
    Run,
    Store,
    Transact,
    Wait,
    Watermarks,
    next_offsets,
)
from outbox.settings import OutboxSettings


class Poison(Exception):
    """What the fake handler raises for a payload it cannot process."""


def message(payload: str, offset: int, *, partition: int = 0, topic: str = "orders") -> Message:
    return Message(topic=topic, partition=partition, offset=offset, value=payload.encode())


def payloads(messages: list[Message]) -> list[str]:
    return [(m.value() or b"").decode() for m in messages]


def settings(**overrides: Any) -> ConsumerSettings:
    values: dict[str, Any] = {
        "max_attempts": 3,
        "backoff_base": 1.0,
        "backoff_cap": 30.0,
        "outbox": OutboxSettings(),
        **overrides,
    }
    return ConsumerSettings("billing", ["orders"], "kafka:9092", **values)


def by_payload(message: Message) -> str:
    """Message ids: the payload, so a test can send the same id twice."""
    return (message.value() or b"").decode()


class Clock:
    """Advances one second per reading."""

    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        self.now += 1.0
        return self.now


class FakeShell:
    """Carries out the core's commands in memory and records them."""

    def __init__(
        self,
        core: ConsumeCore,
        batches: list[list[Message]] | None = None,
        *,
        failing: frozenset[str] = frozenset(),
        stop_at_wait: bool = False,
        claimed: set[str] | None = None,
    ) -> None:
        self.core = core
        self.batches = list(batches or [])
        self.failing = failing
        self.stop_at_wait = stop_at_wait
        self.claimed: set[str] = set(claimed or ())
        self.handled: list[list[str]] = []  # the handler's calls that committed
        self.commands: list[Command | InTransaction] = []
        self.stored: list[tuple[str, int, int]] = []
        self.waits: list[float] = []
        self.dead: list[tuple[str, str]] = []
        self.answers: dict[type, Any] = {}  # per command type: a reply, or an error to raise

    def drive(self, steps: Generator[Any, Any, Any]) -> Any:
        """What a shell's ``_drive`` does: answer each command, or raise its error in."""
        run: Run[Any, Any] = Run(steps)
        while run.command is not None:
            try:
                reply = self.perform(run.command)
            except Exception as exc:
                run.fail(exc)
            else:
                run.answer(reply)
        return run.result

    def turn(self) -> bool:
        return bool(self.drive(self.core.step()))

    def perform(self, command: Command) -> Any:
        self.commands.append(command)
        answer = self.answers.get(type(command))
        if isinstance(answer, Exception):
            raise answer
        match command:
            case Consume():
                return self.batches.pop(0) if self.batches else []
            case Transact():
                return self.transaction(command)
            case Store(offsets):
                self.stored += [(tp.topic, tp.partition, tp.offset) for tp in offsets]
            case Wait(seconds):
                self.waits.append(seconds)
                return self.stop_at_wait
            case DeadLetter(message, error):
                self.dead.append((by_payload(message), repr(error)))
            case Watermarks() | Committed():
                return answer
        return None

    def transaction(self, command: Transact) -> Any:
        """Claims and handler calls kept only if the transaction's steps return."""
        claimed, handled = set(self.claimed), []

        def inside(step: InTransaction) -> Any:
            self.commands.append(step)
            match step:
                case ClaimOne(message_id):
                    new = message_id not in claimed
                    claimed.add(message_id)
                    return new
                case ClaimMany(ids):
                    new_ids = set(ids) - claimed
                    claimed.update(ids)
                    return new_ids
                case Handle(messages):
                    if self.failing & set(payloads(messages)):
                        raise Poison(payloads(messages))
                    handled.append(payloads(messages))
            return None

        run: Run[Any, Any] = Run(self.core.transaction(command))
        while run.command is not None:
            try:
                reply = inside(run.command)
            except Exception as exc:
                run.fail(exc)  # raises: the transaction rolls back
            else:
                run.answer(reply)
        self.claimed, self.handled = claimed, self.handled + handled
        return run.result

    def kinds(self) -> list[str]:
        return [type(c).__name__ for c in self.commands]


def core(registry: CollectorRegistry | None = None, **overrides: Any) -> ConsumeCore:
    return ConsumeCore(settings(**overrides), by_payload, registry, clock=Clock(), rand=lambda: 0.5)


def test_a_batch_goes_in_one_transaction_and_its_offsets_after_it() -> None:
    """Three new messages on two partitions: one claim of all ids, one handler call in order,
    then the next offset of each partition is stored (after the commit, never before)."""
    batch = [message("a", 4), message("b", 7, partition=1), message("c", 5)]
    shell = FakeShell(core(batch_size=10), [batch])
    assert shell.turn() is True
    assert shell.kinds() == ["Consume", "Transact", "ClaimMany", "Handle", "Store"]
    assert shell.commands[0] == Consume(10, 0.5)
    assert shell.handled == [["a", "b", "c"]]
    assert shell.stored == [("orders", 0, 6), ("orders", 1, 8)]
    assert vars(shell.core.progress.stats) == {
        "processed": 3,
        "duplicates": 0,
        "failures": 0,
        "dead_lettered": 0,
    }


def test_one_message_is_claimed_with_a_plain_insert() -> None:
    """A transaction of one message claims it alone (ClaimOne), as the one-by-one path does."""
    shell = FakeShell(core(), [[message("a", 0)]])
    shell.turn()
    assert shell.kinds() == ["Consume", "Transact", "ClaimOne", "Handle", "Store"]
    assert shell.handled == [["a"]]


def test_duplicates_are_skipped_logged_and_acknowledged() -> None:
    """An id claimed before and a second copy within the batch reach no handler; they are
    counted and logged as duplicates, and their offsets are stored with the rest."""
    batch = [message("old", 0), message("new", 1), message("new", 2)]
    shell = FakeShell(core(), [batch], claimed={"old"})
    with capture_logs() as logs:
        shell.turn()
    assert shell.handled == [["new"]]
    assert shell.stored == [("orders", 0, 3)]
    stats = shell.core.progress.stats
    assert (stats.processed, stats.duplicates) == (1, 2)
    skipped = [e["origin"] for e in logs if e["event"] == "consumer.duplicate_skipped"]
    assert skipped == ["orders/0/0", "orders/0/2"]


def test_a_batch_of_duplicates_only_calls_no_handler() -> None:
    shell = FakeShell(core(), [[message("a", 0), message("a", 1)]], claimed={"a"})
    shell.turn()
    assert "Handle" not in shell.kinds()
    assert shell.stored == [("orders", 0, 2)]


def test_without_deduplication_nothing_is_claimed_and_duplicates_are_handled() -> None:
    shell = FakeShell(core(deduplicate=False), [[message("a", 0), message("a", 1)], []])
    shell.turn()
    shell.turn()
    assert shell.kinds() == ["Consume", "Transact", "Handle", "Store", "Consume"]
    assert shell.handled == [["a", "a"]]


def test_a_failing_batch_is_replayed_one_by_one_and_the_poison_dead_lettered() -> None:
    """The batch's transaction rolls back (no claim kept), then each message goes alone: the
    good ones commit, the poison is tried ``max_attempts`` times with jittered waits, then
    dead-lettered, and only then is its offset stored."""
    batch = [message("a", 0), message("poison", 1), message("b", 2)]
    shell = FakeShell(core(), [batch], failing=frozenset({"poison"}))
    with capture_logs() as logs:
        assert shell.turn() is True
    assert shell.handled == [["a"], ["b"]]
    assert shell.dead == [("poison", "Poison(['poison'])")]
    assert shell.waits == [0.5, 1.0]  # rand 0.5 of 1 s, then of 2 s; none after the last try
    assert shell.stored == [("orders", 0, 1), ("orders", 0, 2), ("orders", 0, 3)]
    assert shell.claimed == {"a", "b"}
    stats = shell.core.progress.stats
    assert (stats.processed, stats.failures, stats.dead_lettered) == (2, 3, 1)
    events = [e["event"] for e in logs]
    assert events.count("consumer.batch_failed") == 1
    assert events.count("consumer.handler_failed") == 3


def test_a_message_alone_is_no_batch_to_replay() -> None:
    """One message that fails is retried as itself: no batch transaction first, no replay."""
    shell = FakeShell(core(max_attempts=2), [[message("poison", 0)]], failing=frozenset({"poison"}))
    with capture_logs() as logs:
        shell.turn()
    assert shell.kinds().count("Transact") == 2
    assert "consumer.batch_failed" not in [e["event"] for e in logs]


def test_a_stop_during_the_backoff_leaves_the_message_unacknowledged() -> None:
    """Stopping while a failed message waits for its retry: the step says stop, the message's
    offset is not stored and the messages after it are not processed."""
    batch = [message("poison", 0), message("b", 1)]
    shell = FakeShell(core(batch_size=2), [batch], failing=frozenset({"poison"}), stop_at_wait=True)
    assert shell.turn() is False
    assert shell.stored == []
    assert shell.handled == []
    assert shell.dead == []


def test_a_message_that_cannot_be_dead_lettered_stops_the_loop() -> None:
    """ConsumerStopped from the dead-letter command ends the step: no offset is stored."""
    shell = FakeShell(core(max_attempts=1), [[message("poison", 0)]], failing=frozenset({"poison"}))
    shell.answers[DeadLetter] = ConsumerStopped("no dead-letter topic")
    with pytest.raises(ConsumerStopped):
        shell.turn()
    assert shell.stored == []


def test_a_message_id_that_cannot_be_read_counts_as_a_handler_failure() -> None:
    """The id function raising is the message's failure, as the handler's would be."""

    def broken(message: Message) -> str:
        raise ValueError("no id")

    loop = ConsumeCore(settings(max_attempts=2), broken, clock=Clock(), rand=lambda: 0.0)
    shell = FakeShell(loop, [[message("a", 0)]])
    shell.turn()
    assert "Transact" not in shell.kinds()
    assert shell.dead == [("a", "ValueError('no id')")]
    assert shell.stored == [("orders", 0, 1)]


def test_error_reports_are_left_out_and_only_real_errors_logged() -> None:
    """A partition's end is silent; another error is logged; neither reaches a transaction."""
    end = Message(topic="orders", error=KafkaError(KafkaError._PARTITION_EOF))
    broken = Message(topic="orders", error=KafkaError(KafkaError._TRANSPORT))
    shell = FakeShell(core(), [[end, broken]])
    with capture_logs() as logs:
        assert shell.turn() is True
    assert shell.kinds() == ["Consume"]
    assert [e["event"] for e in logs] == ["consumer.kafka_error"]


def test_with_metrics_the_lag_runs_from_the_committed_offset_to_the_watermark() -> None:
    """On assignment the core asks for the committed offsets; after a batch it reads the
    watermark (a local read) and the lag follows the stored offsets. Transactions are timed
    with the clock."""
    registry = CollectorRegistry()
    loop = core(registry, batch_size=10)
    shell = FakeShell(loop, [[message("a", 4), message("b", 5)]])
    shell.answers[Committed] = [TopicPartition("orders", 0, 4)]
    shell.drive(loop.assigned([TopicPartition("orders", 0)]))
    shell.answers[Watermarks] = (0, 9)
    shell.turn()
    asked = ["Committed", "Consume", "Watermarks", "Transact", "ClaimMany", "Handle", "Store"]
    assert shell.kinds() == asked
    assert loop.progress.lag.lags() == {("orders", 0): 3}
    labels = {"consumer": "billing"}
    assert registry.get_sample_value("outbox_consumer_batch_duration_seconds_sum", labels) == 1.0


def test_without_metrics_no_offsets_or_watermarks_are_asked_for() -> None:
    loop = core()
    shell = FakeShell(loop, [[message("a", 0)]])
    shell.drive(loop.assigned([TopicPartition("orders", 0)]))
    shell.turn()
    assert "Committed" not in shell.kinds()
    assert "Watermarks" not in shell.kinds()


def test_unknown_committed_offsets_are_logged_and_the_partitions_kept() -> None:
    loop = core(CollectorRegistry())
    shell = FakeShell(loop)
    shell.answers[Committed] = KafkaException(KafkaError(KafkaError._TIMED_OUT))
    with capture_logs() as logs:
        shell.drive(loop.assigned([TopicPartition("orders", 0, 7)]))
    assert [e["event"] for e in logs] == ["consumer.committed_unknown"]
    loop.progress.lag.seen("orders", 0, 10)
    assert loop.progress.lag.lags() == {("orders", 0): 3}


@pytest.mark.parametrize(
    ("code", "events"),
    [(KafkaError._NO_OFFSET, []), (KafkaError._TIMED_OUT, ["consumer.commit_failed"])],
)
def test_a_revocation_commits_and_nothing_to_commit_is_no_failure(
    code: int, events: list[str]
) -> None:
    loop = core()
    shell = FakeShell(loop)
    shell.answers[Commit] = KafkaException(KafkaError(code))
    with capture_logs() as logs:
        shell.drive(loop.revoked([TopicPartition("orders", 0)]))
    assert shell.kinds() == ["Commit"]
    assert [e["event"] for e in logs] == events


def test_run_hands_out_commands_until_the_steps_return() -> None:
    """Run, the shells' bookkeeping: the first command at once, each answer sent in, an error
    raised at the yield, the steps' value as the result."""

    def steps() -> Generator[Command, Any, str]:
        first = yield Wait(1.0)
        try:
            yield Commit()
        except KafkaException:
            return f"{first} then failed"
        return "no error"

    run: Run[Command, str] = Run(steps())
    assert run.command == Wait(1.0)
    run.answer(True)
    assert run.command == Commit()
    run.fail(KafkaException(KafkaError(KafkaError._TIMED_OUT)))
    assert run.command is None
    assert run.result == "True then failed"


def test_next_offsets_are_one_past_the_last_message_of_each_partition() -> None:
    offsets = next_offsets([message("a", 3), message("b", 9, partition=2), message("c", 4)])
    assert [(tp.partition, tp.offset) for tp in offsets] == [(0, 5), (2, 10)]
