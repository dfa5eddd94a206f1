"""The consume loop: each message's side effects happen once, although Kafka delivers some twice.

For every message, one database transaction holds both the dedup claim
(:func:`outbox.dedup.claim`) and the handler's side effects; the message's Kafka offset is
stored only after that transaction committed (database first, offset after). A crash between
the two redelivers the message, and the claim recognises it and skips the handler.

    def bill(session: Session, message: Message) -> None:
        order = json.loads(message.value())
        session.add(Invoice(order_id=order["order_id"], total=order["total"]))

    loop = ConsumeLoop(ConsumerSettings("billing", ["orders.placed"], "kafka:9092"),
                       bill, sessionmaker(engine))
    loop.run()          # until SIGTERM / SIGINT, or loop.stop()

:class:`BatchConsumeLoop` hands its handler all of a batch's new messages at once, so the
handler can write their side effects in a few statements instead of one per message (its
figures are on the docs' performance page, "Consumers"):

    def bill_all(session: Session, messages: Sequence[Message]) -> None:
        session.execute(insert(Invoice), [invoice_row(m) for m in messages])

    BatchConsumeLoop(ConsumerSettings(..., batch_size=500), bill_all, sessionmaker(engine)).run()

A handler that raises rolls its transaction back (so no dedup record persists) and is retried
with backoff; after ``max_attempts`` the message goes to the dead-letter topic with the error
in its headers, or, without a dead-letter topic, the loop stops. It is never skipped silently.
A failing batch is replayed one message at a time (a batch handler then gets batches of one),
so one bad message does not hold back the others.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar

import structlog
from confluent_kafka import Consumer, KafkaError, KafkaException, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

from outbox import dedup, tracing
from outbox.backoff import full_jitter
from outbox.consumer_metrics import (
    ConsumeStats,
    Progress,
    metrics_registry,
    partitions_of,
    serve,
)
from outbox.envelope import EVENT_ID_HEADER
from outbox.errors import OutboxError
from outbox.settings import OutboxSettings
from outbox.stopping import StopRequest
from outbox.writer import default

log = structlog.get_logger("outbox.consumer")

Handler = Callable[[Session, Message], None]
BatchHandler = Callable[[Session, Sequence[Message]], None]
MessageId = Callable[[Message], str]

ERROR_HEADER = "x-outbox-error"
ATTEMPTS_HEADER = "x-outbox-attempts"
ORIGIN_HEADER = "x-outbox-origin"  # topic/partition/offset of the original message
CONSUMER_HEADER = "x-outbox-consumer"


class ConsumerStopped(OutboxError):
    """The loop stopped because a message could not be processed and has nowhere else to go."""


def origin_of(message: Message) -> str:
    """Where a message was: topic/partition/offset."""
    return f"{message.topic()}/{message.partition()}/{message.offset()}"


def usable(message: Message) -> bool:
    """A message, not an error report; errors other than a partition's end are logged."""
    error = message.error()
    if error is None:
        return True
    if error.code() != KafkaError._PARTITION_EOF:
        log.warning("consumer.kafka_error", error=str(error))
    return False


def header_pairs(message: Message) -> list[tuple[str, str | bytes | None]]:
    """A message's headers as (name, value) pairs, in order."""
    headers = message.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


def event_id_or_position(message: Message) -> str:
    """The ``event_id`` header set by the relay; for messages from other producers, the
    message's topic, partition and offset (which recognises redeliveries by Kafka only)."""
    for name, value in header_pairs(message):
        if name == EVENT_ID_HEADER and value:
            return value.decode() if isinstance(value, bytes) else str(value)
    return f"{message.topic()}/{message.partition()}/{message.offset()}"


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    #: The consumer's name: its dedup namespace and its Kafka consumer group.
    name: str
    topics: Sequence[str]
    bootstrap_servers: str
    #: Handler attempts per message before it is dead-lettered (or the loop stops).
    max_attempts: int = 5
    backoff_base: float = 0.5
    backoff_cap: float = 30.0
    #: Where exhausted messages go; None stops the loop instead.
    dead_letter_topic: str | None = None
    #: Messages per transaction; a failing batch is replayed one message at a time.
    batch_size: int = 1
    poll_timeout: float = 0.5
    kafka_config: Mapping[str, str] = field(default_factory=dict)
    #: Where the dedup table is; by default where outbox.configure() put the events.
    outbox: OutboxSettings = field(default_factory=lambda: default().settings)
    #: Claim each message id in the dedup table. Turn off only for handlers that are idempotent
    #: by themselves: duplicates then reach the handler.
    deduplicate: bool = True
    #: Serve Prometheus ``/metrics`` on this port while the loop runs (off when None); see
    #: :mod:`outbox.consumer_metrics`.
    metrics_port: int | None = None
    metrics_host: str = "0.0.0.0"  # noqa: S104 - a metrics endpoint is meant to be scraped


H = TypeVar("H", Handler, BatchHandler)


Identified = list[tuple[Message, str]]
#: The messages of a transaction: (handled, skipped as duplicates).
Split = tuple[list[Message], list[Message]]


def one_split(message: Message, applied: bool) -> Split:
    """One message's transaction as a split: handled, or skipped as a duplicate."""
    return ([message], []) if applied else ([], [message])


def serving(settings: ConsumerSettings, registry: CollectorRegistry | None) -> Callable[[], None]:
    """Start serving ``/metrics`` when ``settings.metrics_port`` is set; returns the closer."""
    if settings.metrics_port is None or registry is None:
        return lambda: None
    return serve(registry, settings.metrics_host, settings.metrics_port)


def first_copies(
    messages: Sequence[Message], ids: Sequence[str], new: set[str]
) -> tuple[Identified, Identified]:
    """Split a batch into the first copy of each newly claimed id, in order, and the rest:
    ids claimed before, and second copies within the batch."""
    fresh: Identified = []
    skipped: Identified = []
    unseen = set(new)
    for message, message_id in zip(messages, ids, strict=True):
        if message_id in unseen:
            unseen.discard(message_id)
            fresh.append((message, message_id))
        else:
            skipped.append((message, message_id))
    return fresh, skipped


class DeadLetterTopic:
    """Where a message goes after its last failed attempt: the dead-letter topic, with the
    error, the attempts, the origin and the consumer in its headers. Without a topic, or when
    Kafka does not take it, :class:`ConsumerStopped`: a message is never skipped silently."""

    def __init__(self, settings: ConsumerSettings) -> None:
        self.settings = settings
        self._producer: Producer | None = None

    def send(self, message: Message, error: Exception) -> None:
        topic = self.settings.dead_letter_topic
        origin = origin_of(message)
        if topic is None:
            raise ConsumerStopped(
                f"message {origin} failed {self.settings.max_attempts} times ({error!r}) and no "
                "dead-letter topic is set; the consumer stops so that nothing is skipped"
            )
        headers: list[tuple[str, str | bytes | None]] = [
            *header_pairs(message),
            (ERROR_HEADER, repr(error)[:2000]),
            (ATTEMPTS_HEADER, str(self.settings.max_attempts)),
            (ORIGIN_HEADER, origin),
            (CONSUMER_HEADER, self.settings.name),
        ]
        reports: list[KafkaError | None] = []
        producer = self._producer_once()
        producer.produce(
            topic,
            value=message.value(),
            key=message.key(),
            headers=headers,
            on_delivery=lambda err, _msg: reports.append(err),
        )
        producer.flush(30)
        if reports != [None]:
            raise ConsumerStopped(
                f"could not dead-letter message {origin} to {topic}: {reports or 'no report'}"
            )
        log.error("consumer.dead_lettered", origin=origin, topic=topic, error=repr(error))

    def flush(self) -> None:
        if self._producer is not None:
            self._producer.flush(10)

    def _producer_once(self) -> Producer:
        if self._producer is None:
            config: dict[str, Any] = {
                **self.settings.kafka_config,
                "bootstrap.servers": self.settings.bootstrap_servers,
                "enable.idempotence": True,
                "acks": "all",
            }
            self._producer = Producer(config)
        return self._producer


def consumer_config(settings: ConsumerSettings) -> dict[str, Any]:
    """The Kafka consumer's configuration: offsets are stored by the loop after the database
    commit, and committed by the client periodically, on rebalance and on close."""
    return {
        "auto.offset.reset": "earliest",
        **settings.kafka_config,
        "bootstrap.servers": settings.bootstrap_servers,
        "group.id": settings.name,
        "enable.auto.commit": True,
        "enable.auto.offset.store": False,
    }


def span_attributes(settings: ConsumerSettings) -> dict[str, str | int]:
    """What every process span of a loop says (OpenTelemetry's messaging conventions)."""
    return {
        "messaging.system": "kafka",
        "messaging.operation.type": "process",
        "messaging.operation.name": "process",
        "messaging.consumer.group.name": settings.name,
    }


def message_span_attributes(
    settings: ConsumerSettings, message: Message, message_id: str
) -> dict[str, str | int]:
    """The attributes of the span around one message's handler."""
    return {
        **span_attributes(settings),
        "messaging.destination.name": message.topic() or "",
        "messaging.destination.partition.id": str(message.partition()),
        "messaging.kafka.offset": message.offset() or 0,
        "messaging.message.id": message_id,
    }


def batch_span_attributes(
    settings: ConsumerSettings, messages: Sequence[Message]
) -> tuple[str | None, dict[str, str | int]]:
    """The topic (when the batch has one) and attributes of the span around a batch handler."""
    topics = {message.topic() for message in messages}
    topic = next(iter(topics)) if len(topics) == 1 else None
    attributes = {**span_attributes(settings), "messaging.batch.message_count": len(messages)}
    if topic:
        attributes["messaging.destination.name"] = topic
    return topic, attributes


class _Loop(Generic[H]):
    """The loop around its handler: consuming, dedup, transactions, offsets, retries and dead
    letters. Subclasses say how the new messages of one transaction reach the handler."""

    def __init__(
        self,
        settings: ConsumerSettings,
        handler: H,
        session_factory: Callable[[], Session],
        *,
        message_id: MessageId = event_id_or_position,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.handler: H = handler
        self.session_factory = session_factory
        self.message_id = message_id
        self.registry = metrics_registry(settings.metrics_port, registry)
        self.progress = Progress(settings.name, settings.topics, self.registry)
        self._stop = StopRequest()
        self.dead_letters = DeadLetterTopic(settings)
        self._consumer = Consumer(consumer_config(settings))

    @property
    def stats(self) -> ConsumeStats:
        return self.progress.stats

    def stop(self) -> None:
        """Ask the loop to stop after the message in hand (thread-safe)."""
        self._stop.request("stop()")

    def run(self, *, handle_signals: bool = True) -> None:
        """Consume until :meth:`stop`, SIGTERM/SIGINT (when ``handle_signals``), or a message
        that can be neither processed nor dead-lettered (:class:`ConsumerStopped`)."""
        close_metrics = serving(self.settings, self.registry)  # first: it may refuse its port
        if handle_signals:
            self._stop.install()
        try:
            self._consumer.subscribe(
                list(self.settings.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            log.info(
                "consumer.started", consumer=self.settings.name, topics=list(self.settings.topics)
            )
            while not self._stop.requested:
                batch = self._consumer.consume(self.settings.batch_size, self.settings.poll_timeout)
                messages = [m for m in batch if usable(m)]
                if messages and self.progress.enabled:
                    self._see_watermarks(messages)
                if messages and not self._process(messages):
                    break
        finally:
            self._consumer.close()  # commits the stored offsets
            self.dead_letters.flush()
            self._stop.restore()
            close_metrics()
            log.info("consumer.stopped", consumer=self.settings.name, **vars(self.stats))

    def _process(self, messages: list[Message]) -> bool:
        """Process in order; store each offset once its transaction committed. False: stop."""
        if len(messages) > 1 and self._in_one_transaction(messages):
            self._store(next_offsets(messages))
            return True
        for message in messages:
            if not self._one_by_one(message):
                return False
            self._store(next_offsets([message]))
        return True

    def _see_watermarks(self, messages: list[Message]) -> None:
        """Note the high watermarks of the batch's partitions (local reads, for the lag)."""
        for topic, partition in partitions_of(messages):
            _, high = self._consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            ) or (-1, -1)
            self.progress.lag.seen(topic, partition, high)

    def _store(self, offsets: list[TopicPartition]) -> None:
        self._consumer.store_offsets(offsets=offsets)
        self.progress.lag.stored(offsets)

    def _handle_new(self, session: Session, messages: list[Message], ids: list[str]) -> None:
        """Hand the transaction's new messages (in order, never empty) to the handler."""
        raise NotImplementedError

    def _apply(self, session: Session, message: Message) -> bool:
        """Claim and handle inside the caller's transaction; False for a duplicate."""
        message_id = self.message_id(message)
        if self.settings.deduplicate and not dedup.claim(
            session, self.settings.name, message_id, settings=self.settings.outbox
        ):
            log.info("consumer.duplicate_skipped", message_id=message_id, origin=origin_of(message))
            return False
        self._handle_new(session, [message], [message_id])
        return True

    def _in_one_transaction(self, messages: list[Message]) -> bool:
        started = time.perf_counter()
        try:
            with self.session_factory() as session, session.begin():
                fresh, skipped = self._apply_batch(session, messages)
        except Exception as exc:  # the handler's own errors: replay one by one
            log.info("consumer.batch_failed", size=len(messages), error=repr(exc))
            self.progress.batch_replayed()
            return False
        self.progress.committed(fresh, skipped, time.perf_counter() - started)
        return True

    def _apply_batch(self, session: Session, messages: list[Message]) -> Split:
        """Claim the whole batch in one statement, then handle the new messages in order;
        (the messages handled, the duplicates skipped)."""
        ids = [self.message_id(message) for message in messages]
        new = (
            dedup.claim_many(session, self.settings.name, ids, settings=self.settings.outbox)
            if self.settings.deduplicate
            else None
        )
        if new is None:
            self._handle_new(session, messages, ids)
            return messages, []
        fresh, skipped = first_copies(messages, ids, new)
        for message, message_id in skipped:
            log.info("consumer.duplicate_skipped", message_id=message_id, origin=origin_of(message))
        handled = [m for m, _ in fresh]
        if handled:
            self._handle_new(session, handled, [i for _, i in fresh])
        return handled, [m for m, _ in skipped]

    def _one_by_one(self, message: Message) -> bool:
        error: Exception | None = None
        for attempt in range(self.settings.max_attempts):
            started = time.perf_counter()
            try:
                with self.session_factory() as session, session.begin():
                    applied = self._apply(session, message)
            except Exception as exc:  # any handler error: roll back, retry, then dead-letter
                error = exc
                last = attempt + 1 == self.settings.max_attempts
                self.progress.failed(message, retrying=not last)
                log.warning(
                    "consumer.handler_failed",
                    attempt=attempt + 1,
                    error=repr(exc),
                    topic=message.topic(),
                    offset=message.offset(),
                )
                if not last and self._stop.wait(self._delay(attempt)):
                    return False  # stopping: the message stays unacknowledged
                continue
            self.progress.committed(*one_split(message, applied), time.perf_counter() - started)
            return True
        assert error is not None
        return self._dead_letter(message, error)

    def _delay(self, attempt: int) -> float:
        return full_jitter(attempt, base=self.settings.backoff_base, cap=self.settings.backoff_cap)

    def _dead_letter(self, message: Message, error: Exception) -> bool:
        self.dead_letters.send(message, error)
        self.progress.dead_lettered(message)
        return True

    def _on_assign(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """With metrics, where the lag of the new partitions starts: the committed offsets."""
        if self.progress.enabled:
            self.progress.lag.assigned(committed(consumer.committed, partitions))

    def _on_revoke(self, consumer: Consumer, partitions: list[TopicPartition]) -> None:
        """Commit what is done before the partitions go to another consumer."""
        self.progress.lag.revoked(partitions)
        try:
            consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("consumer.commit_failed", error=str(exc))


def committed(
    ask: Callable[..., list[TopicPartition]], partitions: list[TopicPartition]
) -> list[TopicPartition]:
    """The group's committed offsets of ``partitions``, or the partitions as they are (offset
    unknown) when the broker does not answer within 10 s."""
    try:
        return ask(partitions, timeout=10)
    except KafkaException as exc:
        log.warning("consumer.committed_unknown", error=str(exc))
        return partitions


def next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """The offsets to store once ``messages`` are done: one past the last message of each
    partition (what storing each message's own offset in turn would leave)."""
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        last[(message.topic() or "", message.partition() or 0)] = (message.offset() or 0) + 1
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in last.items()]


class ConsumeLoop(_Loop[Handler]):
    """The consume loop with a handler called once per message, each inside a CONSUMER span
    that continues the trace of the message (with OpenTelemetry)."""

    def _handle_new(self, session: Session, messages: list[Message], ids: list[str]) -> None:
        for message, message_id in zip(messages, ids, strict=True):
            self._handle(session, message, message_id)

    def _handle(self, session: Session, message: Message, message_id: str) -> None:
        """Run the handler; with OpenTelemetry, inside a CONSUMER span that continues the trace
        whose context the message's headers carry (``traceparent``, as ``outbox.add`` stores it)."""
        if not tracing.available():
            self.handler(session, message)
            return
        attributes = message_span_attributes(self.settings, message, message_id)
        with tracing.consuming(message.topic() or "", header_pairs(message), attributes):
            self.handler(session, message)


class BatchConsumeLoop(_Loop[BatchHandler]):
    """The consume loop with a handler called once per transaction with all of its new messages
    (duplicates already left out), in the order consumed. With OpenTelemetry, the call runs
    inside one CONSUMER span linked to the trace of each message."""

    def _handle_new(self, session: Session, messages: list[Message], ids: list[str]) -> None:
        if not tracing.available():
            self.handler(session, messages)
            return
        topic, attributes = batch_span_attributes(self.settings, messages)
        with tracing.consuming_batch(topic, map(header_pairs, messages), attributes):
            self.handler(session, messages)
