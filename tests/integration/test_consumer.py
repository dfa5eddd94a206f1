"""outbox.consumer.ConsumeLoop and BatchConsumeLoop against a real PostgreSQL and Kafka-protocol
broker.

Each loop runs in a thread (``run(handle_signals=False)``) and is stopped with ``loop.stop()``.
The handler writes one row per message into a side-effect table with no unique constraint, so a
side effect applied twice shows as two rows.
"""

from __future__ import annotations

import contextlib
import time
import uuid
from collections import Counter
from collections.abc import Callable, Iterator, Sequence
from threading import Thread

import psycopg
import pytest
import sqlalchemy as sa
from confluent_kafka import Consumer, Message, Producer, TopicPartition
from sqlalchemy.orm import Session, sessionmaker

from outbox import EVENT_ID_HEADER
from outbox.consumer import (
    ATTEMPTS_HEADER,
    CONSUMER_HEADER,
    ERROR_HEADER,
    ORIGIN_HEADER,
    BatchConsumeLoop,
    ConsumeLoop,
    ConsumerSettings,
    ConsumerStopped,
    MessageId,
    event_id_or_position,
    header_pairs,
)
from tests.acceptance.relay_harness import create_topic, wait_until

pytestmark = pytest.mark.kafka

#: Tansu answers a group join after about half the session timeout (23 s with the default 45 s).
KAFKA_CONFIG = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}
#: A group join plus the messages; generous, as the broker can be slow to hand out partitions.
WAIT = 60


class Poison(Exception):
    """What the handler raises for a message it cannot process."""


@pytest.fixture
def effects(database_url: str) -> str:
    """The side-effect table: one row per handler run that committed."""
    with psycopg.connect(database_url) as conn:
        conn.execute(
            "CREATE TABLE effects (message_id text NOT NULL, payload text NOT NULL,"
            " kafka_partition int NOT NULL, kafka_offset bigint NOT NULL)"
        )
    return "effects"


def effect_rows(database_url: str) -> list[tuple[str, str, int, int]]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT message_id, payload, kafka_partition, kafka_offset FROM effects"
        ).fetchall()
    return [(m, p, part, off) for m, p, part, off in rows]


def payload_counts(database_url: str) -> Counter[str]:
    return Counter(payload for _, payload, _, _ in effect_rows(database_url))


def dedup_ids(database_url: str, consumer: str) -> set[str]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT message_id FROM outbox_dedup WHERE consumer = %s", (consumer,)
        ).fetchall()
    return {r[0] for r in rows}


def record(session: Session, message: Message) -> None:
    """The side effect: one row in ``effects``."""
    value = message.value()
    assert value is not None
    session.execute(
        sa.text("INSERT INTO effects VALUES (:id, :payload, :partition, :offset)"),
        {
            "id": event_id_or_position(message),
            "payload": value.decode(),
            "partition": message.partition(),
            "offset": message.offset(),
        },
    )


def produce(
    bootstrap: str,
    topic: str,
    messages: list[tuple[str, str | None]],
    *,
    partition: int | None = None,
) -> None:
    """Send (payload, event id or None) pairs with a plain producer, in order."""
    producer = Producer({"bootstrap.servers": bootstrap})
    reports: list[object] = []
    for payload, event_id in messages:
        headers: list[tuple[str, str | bytes | None]] = []
        if event_id is not None:
            headers.append((EVENT_ID_HEADER, event_id.encode()))
        producer.produce(
            topic,
            value=payload.encode(),
            key=payload.encode(),
            headers=headers,
            partition=-1 if partition is None else partition,  # -1: the partitioner chooses
            on_delivery=lambda err, _msg: reports.append(err),
        )
    assert producer.flush(30) == 0
    assert reports == [None] * len(messages)


def settings(name: str, topic: str, bootstrap: str, **overrides: object) -> ConsumerSettings:
    """Consumer settings with short retries, suited to tests."""
    values: dict[str, object] = {
        "max_attempts": 3,
        "backoff_base": 0.01,
        "backoff_cap": 0.05,
        "poll_timeout": 0.2,
        "kafka_config": KAFKA_CONFIG,
        **overrides,
    }
    return ConsumerSettings(name, [topic], bootstrap, **values)  # type: ignore[arg-type]


def unique_name() -> str:
    return f"consumer-{uuid.uuid4().hex[:12]}"


class Running:
    """A loop running in a thread; ``error`` is what ``run()`` raised, if anything."""

    def __init__(self, loop: ConsumeLoop | BatchConsumeLoop) -> None:
        self.loop = loop
        self.error: BaseException | None = None
        self.thread = Thread(target=self._run, daemon=True)
        self.thread.start()

    def _run(self) -> None:
        try:
            self.loop.run(handle_signals=False)
        except BaseException as exc:  # reported by the test
            self.error = exc

    def stop(self) -> None:
        self.loop.stop()
        self.thread.join(timeout=30)
        assert not self.thread.is_alive(), "the loop did not stop"

    @property
    def seen(self) -> int:
        """Messages the loop finished with: processed, skipped as duplicates, dead-lettered."""
        stats = self.loop.stats
        return stats.processed + stats.duplicates + stats.dead_lettered


@contextlib.contextmanager
def running(
    s: ConsumerSettings,
    handler: Callable[[Session, Message], None],
    engine: sa.Engine,
    **kwargs: MessageId,
) -> Iterator[Running]:
    """Run a ConsumeLoop in a thread for the block; it must not have failed."""
    run = Running(ConsumeLoop(s, handler, sessionmaker(engine), **kwargs))
    try:
        yield run
    finally:
        run.stop()
    assert run.error is None, repr(run.error)


def read_all(bootstrap: str, topic: str, expect: int, timeout: float = 30) -> list[Message]:
    """Every message on ``topic`` (partitions assigned, no group join): ``expect`` of them, and
    whatever else arrives within a short quiet period after."""
    consumer = Consumer(
        {"bootstrap.servers": bootstrap, "group.id": unique_name(), "enable.auto.commit": False}
    )
    partitions = consumer.list_topics(topic, timeout=30).topics[topic].partitions
    consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
    received: list[Message] = []
    deadline = time.monotonic() + timeout
    quiet_until: float | None = None
    try:
        while time.monotonic() < (quiet_until or deadline):
            msg = consumer.poll(0.2)
            if msg is not None and msg.error() is None:
                received.append(msg)
                if len(received) >= expect and quiet_until is None:
                    quiet_until = time.monotonic() + 1.0
    finally:
        consumer.close()
    return received


def committed_offset(bootstrap: str, group: str, topic: str, partition: int) -> int:
    """The offset the group committed for one partition (negative when none)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        (tp,) = consumer.committed([TopicPartition(topic, partition)], timeout=30)
    finally:
        consumer.close()
    return int(tp.offset)


# --- duplicates ----------------------------------------------------------------------------------


@pytest.mark.parametrize("batch_size", [1, 50])
def test_a_message_delivered_twice_has_its_side_effect_once(
    database_url: str,
    engine: sa.Engine,
    kafka_bootstrap: str,
    topic: str,
    effects: str,
    batch_size: int,
) -> None:
    """The same event id delivered twice, one message at a time or within one batch (one
    claim_many): the handler's side effect happens once, and the loop counts one duplicate."""
    name = unique_name()
    twice, once = str(uuid.uuid4()), str(uuid.uuid4())
    produce(kafka_bootstrap, topic, [("order-1", twice), ("order-2", once), ("order-1", twice)])
    config = settings(name, topic, kafka_bootstrap, batch_size=batch_size)
    with running(config, record, engine) as run:
        wait_until(lambda: run.seen >= 3, timeout=WAIT)
        time.sleep(0.5)  # anything more would be a bug; give it a chance to show
    assert (run.loop.stats.processed, run.loop.stats.duplicates) == (2, 1)
    assert payload_counts(database_url) == Counter({"order-1": 1, "order-2": 1})
    assert dedup_ids(database_url, name) == {twice, once}


def test_without_deduplication_duplicates_reach_the_handler(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """deduplicate=False (for handlers idempotent by themselves): no claim, no dedup record,
    and a message delivered twice is handled twice."""
    name = unique_name()
    twice = str(uuid.uuid4())
    produce(kafka_bootstrap, topic, [("order-1", twice), ("order-1", twice)])
    with running(settings(name, topic, kafka_bootstrap, deduplicate=False), record, engine) as run:
        wait_until(lambda: run.seen >= 2, timeout=WAIT)
        wait_until(lambda: run.loop.stats.processed >= 2, timeout=WAIT)
    assert (run.loop.stats.processed, run.loop.stats.duplicates) == (2, 0)
    assert payload_counts(database_url) == Counter({"order-1": 2})
    assert dedup_ids(database_url, name) == set()


def test_without_event_id_the_position_is_the_id(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """Messages without an event_id header are deduplicated on topic/partition/offset."""
    name = unique_name()
    produce(kafka_bootstrap, topic, [(f"plain-{i}", None) for i in range(6)])
    with running(settings(name, topic, kafka_bootstrap), record, engine) as run:
        wait_until(lambda: run.seen >= 6, timeout=WAIT)
    assert run.loop.stats.processed == 6
    rows = effect_rows(database_url)
    assert sorted(payload for _, payload, _, _ in rows) == [f"plain-{i}" for i in range(6)]
    positions = {f"{topic}/{partition}/{offset}" for _, _, partition, offset in rows}
    assert len(positions) == 6
    assert {message_id for message_id, _, _, _ in rows} == positions
    assert dedup_ids(database_url, name) == positions


def test_a_custom_message_id_function_is_used(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """Given message_id=..., the loop claims that id: two messages with the same business id
    (and different event ids) make one side effect."""
    name = unique_name()

    def business_id(message: Message) -> str:
        value = message.value()
        assert value is not None
        return "order:" + value.decode().split("#")[0]

    produce(
        kafka_bootstrap,
        topic,
        [("a#1", str(uuid.uuid4())), ("b#1", str(uuid.uuid4())), ("a#2", str(uuid.uuid4()))],
        partition=0,
    )
    s = settings(name, topic, kafka_bootstrap)
    with running(s, record, engine, message_id=business_id) as run:
        wait_until(lambda: run.seen >= 3, timeout=WAIT)
    assert (run.loop.stats.processed, run.loop.stats.duplicates) == (2, 1)
    assert payload_counts(database_url) == Counter({"a#1": 1, "b#1": 1})
    assert dedup_ids(database_url, name) == {"order:a", "order:b"}


# --- batches -------------------------------------------------------------------------------------


def test_batch_mode_applies_each_side_effect_once(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """batch_size=50 over 500 messages: one side effect each, in fewer transactions than
    messages."""
    name = unique_name()
    ids = [str(uuid.uuid4()) for _ in range(500)]
    produce(kafka_bootstrap, topic, [(f"m-{i}", event_id) for i, event_id in enumerate(ids)])
    sessions = 0
    factory = sessionmaker(engine)

    def counting_factory() -> Session:
        nonlocal sessions
        sessions += 1
        return factory()

    loop = ConsumeLoop(
        settings(name, topic, kafka_bootstrap, batch_size=50), record, counting_factory
    )
    run = Running(loop)
    try:
        wait_until(lambda: run.seen >= 500, timeout=WAIT)
        time.sleep(0.5)
    finally:
        run.stop()
    assert run.error is None
    assert (loop.stats.processed, loop.stats.duplicates, loop.stats.failures) == (500, 0, 0)
    rows = effect_rows(database_url)
    assert len(rows) == 500
    assert sorted(message_id for message_id, _, _, _ in rows) == sorted(ids)
    assert sessions < 500 / 2, f"{sessions} transactions for 500 messages: batches were not used"
    print(f"\nbatch mode: 500 messages in {sessions} transactions")


class BatchRecorder:
    """A batch handler: records all of a batch's messages in one statement, and what it was
    given; raises for a batch holding a message whose payload starts with "poison"."""

    def __init__(self) -> None:
        self.batches: list[list[tuple[str, int, int]]] = []  # (payload, partition, offset)

    def __call__(self, session: Session, messages: Sequence[Message]) -> None:
        seen = [(m.value() or b"").decode() for m in messages]
        self.batches.append(
            [(p, m.partition() or 0, m.offset() or 0) for p, m in zip(seen, messages, strict=True)]
        )
        if any(p.startswith("poison") for p in seen):
            raise Poison(f"cannot process a batch holding {seen}")
        session.execute(
            sa.text("INSERT INTO effects VALUES (:id, :payload, :partition, :offset)"),
            [
                {
                    "id": event_id_or_position(m),
                    "payload": p,
                    "partition": m.partition(),
                    "offset": m.offset(),
                }
                for p, m in zip(seen, messages, strict=True)
            ],
        )

    def calls(self, payload: str) -> int:
        return sum(p == payload for batch in self.batches for p, _, _ in batch)


def test_a_batch_handler_gets_each_new_message_once_in_order(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """BatchConsumeLoop over 300 messages on one partition, 30 of them sent again (some
    within the same batch, some later): the handler gets whole batches of new messages only,
    in offset order; each side effect happens once; the committed offset is past the last."""
    name = unique_name()
    ids = [str(uuid.uuid4()) for _ in range(270)]
    sent = [(f"m-{i}", event_id) for i, event_id in enumerate(ids)]
    sent[100:100] = sent[90:100]  # again, right behind the first copies
    sent += sent[:20]  # again, after everything else
    produce(kafka_bootstrap, topic, sent, partition=0)
    handler = BatchRecorder()
    loop = BatchConsumeLoop(
        settings(name, topic, kafka_bootstrap, batch_size=100), handler, sessionmaker(engine)
    )
    run = Running(loop)
    try:
        wait_until(lambda: run.seen >= 300, timeout=WAIT)
        time.sleep(0.5)
    finally:
        run.stop()
    assert run.error is None, repr(run.error)
    assert (loop.stats.processed, loop.stats.duplicates, loop.stats.failures) == (270, 30, 0)
    assert payload_counts(database_url) == Counter({f"m-{i}": 1 for i in range(270)})
    assert dedup_ids(database_url, name) == set(ids)
    handed = [offset for batch in handler.batches for _, _, offset in batch]
    assert handed == sorted(handed), "messages reached the handler out of order"
    assert [p for batch in handler.batches for p, _, _ in batch] == [f"m-{i}" for i in range(270)]
    assert len(handler.batches) < 270 / 2, f"{len(handler.batches)} calls: batches were not used"
    assert committed_offset(kafka_bootstrap, name, topic, 0) == 300


def test_a_failing_batch_is_replayed_to_the_batch_handler_one_message_at_a_time(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """A batch holding a poison message rolls back whole; it is replayed in batches of one:
    the poison message is retried max_attempts times and dead-lettered, every other message's
    side effect happens once."""
    name = unique_name()
    dlq = create_topic(kafka_bootstrap, partitions=1)
    payloads = [f"ok-{i}" for i in range(4)] + ["poison"] + [f"ok-{i}" for i in range(4, 9)]
    ids = {payload: str(uuid.uuid4()) for payload in payloads}
    produce(kafka_bootstrap, topic, [(p, ids[p]) for p in payloads], partition=0)
    handler = BatchRecorder()
    s = settings(name, topic, kafka_bootstrap, batch_size=50, dead_letter_topic=dlq)
    run = Running(BatchConsumeLoop(s, handler, sessionmaker(engine)))
    try:
        wait_until(lambda: run.seen >= len(payloads), timeout=WAIT)
        time.sleep(0.5)
    finally:
        run.stop()
    assert run.error is None, repr(run.error)
    stats = run.loop.stats
    assert (stats.processed, stats.dead_lettered, stats.duplicates, stats.failures) == (9, 1, 0, 3)
    assert len(handler.batches[0]) > 1, "the poison message was not in a batch with others"
    assert all(len(batch) == 1 for batch in handler.batches[1:])
    assert handler.calls("poison") == 1 + 3
    assert payload_counts(database_url) == Counter({p: 1 for p in payloads if p != "poison"})
    assert dedup_ids(database_url, name) == {ids[p] for p in payloads if p != "poison"}
    (dead,) = read_all(kafka_bootstrap, dlq, expect=1)
    assert dead.value() == b"poison"


# --- failures ------------------------------------------------------------------------------------


class PoisonHandler:
    """Records every message, except the ones whose payload starts with "poison": those raise.
    Counts calls per payload."""

    def __init__(self) -> None:
        self.calls: Counter[str] = Counter()

    def __call__(self, session: Session, message: Message) -> None:
        value = message.value()
        assert value is not None
        self.calls[value.decode()] += 1
        if value.startswith(b"poison"):
            raise Poison(f"cannot process {value.decode()}")
        record(session, message)


@pytest.mark.parametrize("batch_size", [1, 50])
def test_a_failing_message_is_retried_then_dead_lettered(
    batch_size: int,
    database_url: str,
    engine: sa.Engine,
    kafka_bootstrap: str,
    topic: str,
    effects: str,
) -> None:
    """A handler that always raises for one message: retried max_attempts times, no dedup
    record kept, sent to the dead-letter topic with the error in its headers; every other
    message (the rest of its batch too) processed exactly once."""
    name = unique_name()
    dlq = create_topic(kafka_bootstrap, partitions=1)
    payloads = [f"ok-{i}" for i in range(4)] + ["poison"] + [f"ok-{i}" for i in range(4, 9)]
    ids = {payload: str(uuid.uuid4()) for payload in payloads}
    # One partition, produced before the loop joins: with batch_size=50 the first batch holds
    # the poison message and others.
    produce(kafka_bootstrap, topic, [(p, ids[p]) for p in payloads], partition=0)
    handler = PoisonHandler()
    s = settings(name, topic, kafka_bootstrap, batch_size=batch_size, dead_letter_topic=dlq)
    with running(s, handler, engine) as run:
        wait_until(lambda: run.seen >= len(payloads), timeout=WAIT)
        time.sleep(0.5)
    stats = run.loop.stats
    assert (stats.processed, stats.dead_lettered, stats.duplicates) == (9, 1, 0)
    assert stats.failures == 3
    if batch_size == 1:
        assert handler.calls["poison"] == 3
    else:
        # One failed batch, then 3 attempts one by one; the batch's other messages ran twice
        # (the batch rolled back) but their side effects happened once.
        assert handler.calls["poison"] == 4
        assert any(count == 2 for payload, count in handler.calls.items() if payload != "poison")
    assert payload_counts(database_url) == Counter({p: 1 for p in payloads if p != "poison"})
    assert ids["poison"] not in dedup_ids(database_url, name)
    assert dedup_ids(database_url, name) == {ids[p] for p in payloads if p != "poison"}

    (dead,) = read_all(kafka_bootstrap, dlq, expect=1)
    headers = {name: value for name, value in header_pairs(dead) if isinstance(value, bytes)}
    assert dead.value() == b"poison"
    assert dead.key() == b"poison"
    assert headers[EVENT_ID_HEADER] == ids["poison"].encode()
    assert b"Poison" in headers[ERROR_HEADER]
    assert b"cannot process poison" in headers[ERROR_HEADER]
    assert headers[ATTEMPTS_HEADER] == b"3"
    assert headers[ORIGIN_HEADER] == f"{topic}/0/4".encode()
    assert headers[CONSUMER_HEADER] == name.encode()


def test_without_a_dead_letter_topic_the_loop_stops_and_keeps_the_offset(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """Attempts exhausted and no dead-letter topic: run() raises ConsumerStopped, the failing
    message's offset is not committed, and the next loop of that name receives it again."""
    name = unique_name()
    payloads = ["ok-0", "poison", "ok-2"]
    produce(kafka_bootstrap, topic, [(p, str(uuid.uuid4())) for p in payloads], partition=0)
    handler = PoisonHandler()
    run = Running(
        ConsumeLoop(settings(name, topic, kafka_bootstrap), handler, sessionmaker(engine))
    )
    run.thread.join(timeout=WAIT)
    assert not run.thread.is_alive(), "the loop did not stop on its own"
    assert isinstance(run.error, ConsumerStopped), repr(run.error)
    assert "no dead-letter topic" in str(run.error)
    assert handler.calls == Counter({"ok-0": 1, "poison": 3})
    assert payload_counts(database_url) == Counter({"ok-0": 1})
    assert committed_offset(kafka_bootstrap, name, topic, 0) == 1  # the poison message's own

    def cured(session: Session, message: Message) -> None:
        record(session, message)

    with running(settings(name, topic, kafka_bootstrap), cured, engine) as second:
        wait_until(lambda: payload_counts(database_url)["ok-2"] == 1, timeout=WAIT)
        time.sleep(0.5)
    assert second.loop.stats.processed == 2
    assert second.loop.stats.duplicates == 0
    assert payload_counts(database_url) == Counter({"ok-0": 1, "poison": 1, "ok-2": 1})
    assert committed_offset(kafka_bootstrap, name, topic, 0) == 3


def test_a_handler_that_fails_once_then_succeeds(
    database_url: str, engine: sa.Engine, kafka_bootstrap: str, topic: str, effects: str
) -> None:
    """One failure then success: the side effect happens once, stats.failures == 1."""
    name = unique_name()
    event_id = str(uuid.uuid4())
    produce(kafka_bootstrap, topic, [("flaky", event_id)])
    calls = 0

    def flaky(session: Session, message: Message) -> None:
        nonlocal calls
        calls += 1
        record(session, message)  # rolled back with the failure below
        if calls == 1:
            raise Poison("transient")

    with running(settings(name, topic, kafka_bootstrap), flaky, engine) as run:
        wait_until(lambda: run.seen >= 1, timeout=WAIT)
        time.sleep(0.5)
    stats = run.loop.stats
    assert (stats.processed, stats.failures, stats.duplicates, stats.dead_lettered) == (1, 1, 0, 0)
    assert calls == 2
    assert payload_counts(database_url) == Counter({"flaky": 1})
    assert dedup_ids(database_url, name) == {event_id}
