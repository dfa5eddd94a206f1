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

import functools
from collections.abc import Callable, Generator, Mapping, Sequence
from dataclasses import dataclass, field
from typing import Any, Generic, TypeVar, assert_never

import structlog
from confluent_kafka import Consumer, KafkaError, Message, Producer, TopicPartition
from prometheus_client import CollectorRegistry
from sqlalchemy.orm import Session

from outbox import cloudevents, dedup, tracing
from outbox.client_logs import ClientLog
from outbox.consumer_core import (
    C,
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
    Probe,
    Run,
    Split,
    Store,
    Transact,
    Wait,
    Watermarks,
    origin_of,
)
from outbox.consumer_core import first_copies as first_copies  # its older home
from outbox.consumer_metrics import ConsumeStats, serve
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

T = TypeVar("T")


class ConsumerStopped(OutboxError):
    """The loop stopped because a message could not be processed and has nowhere else to go."""


def header_pairs(message: Message) -> list[tuple[str, str | bytes | None]]:
    """A message's headers as (name, value) pairs, in order."""
    headers = message.headers() or []
    return list(headers.items()) if isinstance(headers, dict) else list(headers)


#: The id header of records from Debezium's Outbox Event Router (``--record-format debezium``).
DEBEZIUM_ID_HEADER = "id"


def event_id_or_position(message: Message) -> str:
    """The message's event id: the ``event_id`` header set by the relay; else CloudEvents'
    ``ce_id`` header (binary mode); else, for an ``application/cloudevents+json`` value
    (structured mode), its ``id``. For messages with none of them, the message's topic,
    partition and offset (which recognises redeliveries by Kafka only).

    A header named ``id`` is not read: other producers use that name for what is not unique
    (an order's id), and taking it as the message id would skip their messages as duplicates.
    For Debezium's records use :func:`debezium_id_or_position`."""
    pairs = header_pairs(message)
    for name, value in pairs:  # the common case first: the relay's own records
        if name == EVENT_ID_HEADER and value:
            return _text(value)
    found: dict[str, str | bytes] = {}
    for name, value in pairs:
        if value and name not in found:
            found[name] = value
    if cloudevents.ID_HEADER in found:
        return _text(found[cloudevents.ID_HEADER])
    content_type = found.get(cloudevents.CONTENT_TYPE_HEADER)
    if content_type and cloudevents.is_structured(_text(content_type)):
        event_id = cloudevents.structured_id(message.value())
        if event_id:
            return event_id
    return f"{message.topic()}/{message.partition()}/{message.offset()}"


def debezium_id_or_position(message: Message) -> str:
    """For consumers of Debezium's Outbox Event Router and of ``--record-format debezium``:
    the ``id`` header (the event's id), else :func:`event_id_or_position`. Opt in with
    ``message_id=debezium_id_or_position`` only where every producer of the topics means the
    event's id by that header."""
    for name, value in header_pairs(message):
        if name == DEBEZIUM_ID_HEADER and value:
            return _text(value)
    return event_id_or_position(message)


def _text(value: str | bytes) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


@dataclass(frozen=True, slots=True)
class ConsumerSettings:
    """Where a consume loop reads, and how it retries, dead-letters and deduplicates.

    ``ConsumerSettings("billing", ["orders.placed"], "kafka:9092")`` is enough to start; every
    other field has a default and is a keyword of the constructor.
    """

    name: str
    """The consumer's name: its dedup namespace and its Kafka consumer group (``group.id``)."""
    topics: Sequence[str]
    """The topics to subscribe to."""
    bootstrap_servers: str
    """Kafka brokers, ``host:port[,...]``."""
    max_attempts: int = 5
    """Handler attempts per message before it is dead-lettered (or the loop stops)."""
    backoff_base: float = 0.5
    """Seconds: retry ``n`` (from 0) waits a random time up to
    ``min(backoff_cap, backoff_base * 2**n)``."""
    backoff_cap: float = 30.0
    """Seconds: the longest wait between two attempts at a message."""
    dead_letter_topic: str | None = None
    """Where a message goes after its last failed attempt, with the error, the attempts, its
    origin and the consumer in its headers; ``None`` stops the loop with ``ConsumerStopped``."""
    batch_size: int = 1
    """Messages per transaction (one ``claim_many``); a failing batch is replayed one message
    at a time."""
    poll_timeout: float = 0.5
    """Seconds each poll of Kafka waits for messages (up to ``batch_size``)."""
    connect_timeout: float = 30.0
    """Seconds the loop waits at start for a broker to answer before it fails with
    :class:`~outbox.errors.BrokerUnreachableError`."""
    kafka_config: Mapping[str, str] = field(default_factory=dict)
    """librdkafka settings for the loop's consumer and its dead-letter producer: security
    (``security.protocol``, ``sasl.mechanism``, ``sasl.username``, ``sasl.password``,
    ``ssl.ca.location``), the group's timeouts (``session.timeout.ms``), ``auto.offset.reset``
    (``earliest`` by default). The loop's ``bootstrap.servers``, ``group.id``,
    ``enable.auto.commit`` and ``enable.auto.offset.store`` take precedence."""
    outbox: OutboxSettings = field(default_factory=lambda: default().settings)
    """Where the dedup table is; by default where ``outbox.configure()`` put the events."""
    deduplicate: bool = True
    """Claim each message id in the dedup table. Turn off only for handlers that are idempotent
    by themselves: duplicates then reach the handler."""
    metrics_port: int | None = None
    """Serve Prometheus ``/metrics`` on this port while the loop runs (off when None); see
    :mod:`outbox.consumer_metrics`."""
    metrics_host: str = "0.0.0.0"  # noqa: S104 - a metrics endpoint is meant to be scraped
    """Interface the metrics server listens on (all of them by default)."""


H = TypeVar("H", Handler, BatchHandler)


def serving(settings: ConsumerSettings, registry: CollectorRegistry | None) -> Callable[[], None]:
    """Start serving ``/metrics`` when ``settings.metrics_port`` is set; returns the closer."""
    if settings.metrics_port is None or registry is None:
        return lambda: None
    return serve(registry, settings.metrics_host, settings.metrics_port)


class DeadLetterTopic:
    """Where a message goes after its last failed attempt: the dead-letter topic, with the
    error, the attempts, the origin and the consumer in its headers. Without a topic, or when
    Kafka does not take it, :class:`ConsumerStopped`: a message is never skipped silently."""

    def __init__(self, settings: ConsumerSettings, client_log: ClientLog | None = None) -> None:
        self.settings = settings
        self.client_log = client_log or ClientLog()
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
                "logger": self.client_log,
                "error_cb": self.client_log.error,
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
    """The loop around its handler, blocking: it carries out the commands of its
    :class:`~outbox.consumer_core.ConsumeCore`, which decides. Subclasses say how the new
    messages of one transaction reach the handler."""

    def __init__(
        self,
        settings: ConsumerSettings,
        handler: H,
        session_factory: Callable[[], Session],
        *,
        message_id: MessageId = event_id_or_position,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """:param settings: where to read, and how to retry, dead-letter and deduplicate.
        :param handler: ``handler(session, message)`` (the batch loop: ``handler(session,
            messages)``), called inside the transaction that holds the dedup claim; it must
            not commit.
        :param session_factory: makes each transaction's session (a ``sessionmaker``).
        :param message_id: the id the dedup table records; by default the relay's ``event_id``
            header, else a CloudEvent's id, else topic/partition/offset
            (:func:`event_id_or_position`); for Debezium's records,
            :func:`debezium_id_or_position`.
        :param registry: a Prometheus registry to record the loop's metrics into; see
            :mod:`outbox.consumer_metrics`.
        """
        self.settings = settings
        self.handler: H = handler
        self.session_factory = session_factory
        self.core = ConsumeCore(settings, message_id, registry)
        self._stop = StopRequest()
        self.dead_letters = DeadLetterTopic(settings, self.core.client_log)
        self._consumer = Consumer(
            {
                **consumer_config(settings),
                "logger": self.core.client_log,
                "error_cb": self.core.kafka_error,
            }
        )

    @property
    def stats(self) -> ConsumeStats:
        return self.core.progress.stats

    def stop(self) -> None:
        """Ask the loop to stop after the message in hand (thread-safe)."""
        self._stop.request("stop()")

    def run(self, *, handle_signals: bool = True) -> None:
        """Consume until :meth:`stop`, SIGTERM/SIGINT (when ``handle_signals``), or a message
        that can be neither processed nor dead-lettered (:class:`ConsumerStopped`)."""
        close_metrics = serving(self.settings, self.core.registry)  # first: it may refuse its port
        if handle_signals:
            self._stop.install()
        try:
            self._consumer.subscribe(
                list(self.settings.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            self.core.started()
            running = True
            while running and not self._stop.requested:
                running = self._drive(self.core.step(), self._perform)
        finally:
            self._consumer.close()  # commits the stored offsets
            self.dead_letters.flush()
            self._stop.restore()
            close_metrics()
            self.core.stopped()

    def _drive(self, steps: Generator[C, Any, T], perform: Callable[[C], object]) -> T:
        """Carry out the core's steps with ``perform``, blocking; what they returned."""
        run = Run(steps)
        while run.command is not None:
            try:
                reply = perform(run.command)
            except Exception as exc:  # raised in the step that asked
                run.fail(exc)
            else:
                run.answer(reply)
        return run.result

    def _perform(self, command: Command) -> object:
        consumer = self._consumer
        match command:
            case Consume(size, timeout):
                return consumer.consume(size, timeout)
            case Probe(timeout):
                consumer.list_topics(timeout=timeout)
                return None
            case Transact():
                return self._transact(command)
            case Store(offsets):
                consumer.store_offsets(offsets=offsets)
                return None
            case Wait(seconds):
                return self._stop.wait(seconds)
            case DeadLetter(message, error):
                self.dead_letters.send(message, error)
                return None
            case Watermarks(partition):
                return consumer.get_watermark_offsets(partition, cached=True)
            case Committed(partitions):
                return consumer.committed(partitions, timeout=10)
            case Commit():
                return consumer.commit(asynchronous=False)
        assert_never(command)

    def _transact(self, command: Transact) -> Split:
        with self.session_factory() as session, session.begin():
            steps = self.core.transaction(command)
            return self._drive(steps, functools.partial(self._in_transaction, session))

    def _in_transaction(self, session: Session, command: InTransaction) -> object:
        name, outbox = self.settings.name, self.settings.outbox
        match command:
            case ClaimOne(message_id):
                return dedup.claim(session, name, message_id, settings=outbox)
            case ClaimMany(ids):
                return dedup.claim_many(session, name, ids, settings=outbox)
            case Handle(messages, ids):
                self._handle_new(session, messages, ids)
                return None
        assert_never(command)

    def _handle_new(self, session: Session, messages: list[Message], ids: list[str]) -> None:
        """Hand the transaction's new messages (in order, never empty) to the handler."""
        raise NotImplementedError

    def _on_assign(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drive(self.core.assigned(partitions), self._perform)

    def _on_revoke(self, _consumer: Consumer, partitions: list[TopicPartition]) -> None:
        self._drive(self.core.revoked(partitions), self._perform)


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
