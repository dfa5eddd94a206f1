"""The consume loop's decisions, written once and doing no I/O.

:mod:`outbox.consumer` (blocking) and :mod:`outbox.consumer_async` (asyncio) are two shells
around one :class:`ConsumeCore`. The core's steps are generators: each yields a command
(consume a batch, run a transaction, store offsets, wait, dead-letter a message...) and gets
its answer back, or the command's error raised at the ``yield``. A shell carries the commands
out, with blocking calls or with awaits, and decides nothing: whether a batch goes in one
transaction or one message at a time, when to retry, when to dead-letter or stop, which offsets
to store, what to count and when to give up on an unreachable broker
(:mod:`outbox.consumer_broker`) are decided here once (as h11 keeps HTTP's rules apart from the
sockets), and are tested without a broker or a database (``tests/unit/test_consumer_core.py``,
``tests/unit/test_consumer_broker.py``).
"""

from __future__ import annotations

import random
import time
from collections.abc import Callable, Generator, Sequence
from dataclasses import dataclass
from typing import TYPE_CHECKING, Any, Generic, TypeVar

import structlog
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from prometheus_client import CollectorRegistry

from outbox.backoff import full_jitter
from outbox.client_logs import ClientLog
from outbox.consumer_broker import BrokerWatch
from outbox.consumer_metrics import BrokerGauge, Progress, metrics_registry, partitions_of

if TYPE_CHECKING:
    from outbox.consumer import ConsumerSettings, MessageId

log = structlog.get_logger("outbox.consumer")

T = TypeVar("T")
Identified = list[tuple[Message, str]]
#: The messages of a transaction: (handled, skipped as duplicates).
Split = tuple[list[Message], list[Message]]


@dataclass(frozen=True, slots=True)
class Consume:
    """Up to ``size`` messages or error reports, waiting up to ``timeout`` s. Answer: the list."""

    size: int
    timeout: float


@dataclass(frozen=True, slots=True)
class Probe:
    """Ask a broker for metadata, waiting up to ``timeout`` s: whether one answers. Answer:
    None; KafkaException raised when none did."""

    timeout: float


@dataclass(frozen=True, slots=True)
class Transact:
    """One database transaction: carry out :meth:`ConsumeCore.transaction`'s steps inside it,
    then commit. Answer: what the steps returned; what they raised is raised (rolled back)."""

    messages: list[Message]
    ids: list[str]


@dataclass(frozen=True, slots=True)
class ClaimOne:
    """In a transaction: claim one message id in the dedup table. Answer: True the first time."""

    message_id: str


@dataclass(frozen=True, slots=True)
class ClaimMany:
    """In a transaction: claim ``ids`` in one statement. Answer: the set of ids claimed now."""

    ids: list[str]


@dataclass(frozen=True, slots=True)
class Handle:
    """In a transaction: hand ``messages`` (new, in order, never empty) to the handler. Answer:
    None; what the handler raised is raised."""

    messages: list[Message]
    ids: list[str]


@dataclass(frozen=True, slots=True)
class Store:
    """Store ``offsets`` for the client's next commit. Answer: None."""

    offsets: list[TopicPartition]


@dataclass(frozen=True, slots=True)
class Wait:
    """Sleep ``seconds``, less if a stop is requested. Answer: whether one was."""

    seconds: float


@dataclass(frozen=True, slots=True)
class DeadLetter:
    """Send ``message`` to the dead-letter topic. Answer: None; ``ConsumerStopped`` is raised
    when there is none or Kafka did not take it."""

    message: Message
    error: Exception


@dataclass(frozen=True, slots=True)
class Watermarks:
    """The (low, high) watermarks the client last saw for ``partition``: a local read, no
    request. Answer: the pair, or None."""

    partition: TopicPartition


@dataclass(frozen=True, slots=True)
class Committed:
    """The group's committed offsets of ``partitions`` (one request, 10 s at most). Answer: the
    partitions with their offsets; KafkaException raised."""

    partitions: list[TopicPartition]


@dataclass(frozen=True, slots=True)
class Commit:
    """Commit the stored offsets now, synchronously. Answer: None; KafkaException raised."""


#: What the loop asks of its shell.
Command = Consume | Probe | Transact | Store | Wait | DeadLetter | Watermarks | Committed | Commit
#: What a transaction asks of its shell, inside the transaction.
InTransaction = ClaimOne | ClaimMany | Handle
C = TypeVar("C", Command, InTransaction)
#: Steps of the core: they yield commands, get their answers, and return a ``T``.
Steps = Generator[Command, Any, T]
TransactionSteps = Generator[InTransaction, Any, T]


class Run(Generic[C, T]):
    """Steps being carried out by a shell: :attr:`command` is what to do next, None once the
    steps returned :attr:`result`. The shell answers each command (:meth:`answer`) or reports
    the error that carrying it out raised (:meth:`fail`)."""

    _result: T

    def __init__(self, steps: Generator[C, Any, T]) -> None:
        self._steps: Generator[C, Any, T] = steps
        self.command: C | None = None
        self._advance(steps.send, None)

    @property
    def result(self) -> T:
        return self._result

    def answer(self, reply: object) -> None:
        self._advance(self._steps.send, reply)

    def fail(self, error: Exception) -> None:
        self._advance(self._steps.throw, error)

    def _advance(self, move: Callable[[Any], C], value: Any) -> None:
        try:
            self.command = move(value)
        except StopIteration as done:
            self.command = None
            self._result = done.value


@dataclass(frozen=True, slots=True)
class Claimed:
    """A transaction's messages once claimed: the handler's (the first copy of each id claimed
    now, in order) with their ids, and the duplicates skipped."""

    messages: list[Message]
    ids: list[str]
    skipped: list[Message]

    @property
    def split(self) -> Split:
        return self.messages, self.skipped


def origin_of(message: Message) -> str:
    """Where a message was: topic/partition/offset."""
    return f"{message.topic()}/{message.partition()}/{message.offset()}"


def usable(message: Message, client_log: ClientLog) -> bool:
    """A message, not an error report; errors other than a partition's end are logged."""
    error = message.error()
    if error is None:
        return True
    if error.code() != KafkaError._PARTITION_EOF:
        client_log.error(error)
    return False


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


def next_offsets(messages: Sequence[Message]) -> list[TopicPartition]:
    """The offsets to store once ``messages`` are done: one past the last message of each
    partition (what storing each message's own offset in turn would leave)."""
    last: dict[tuple[str, int], int] = {}
    for message in messages:
        last[(message.topic() or "", message.partition() or 0)] = (message.offset() or 0) + 1
    return [TopicPartition(topic, partition, offset) for (topic, partition), offset in last.items()]


class ConsumeCore:
    """One consume loop's decisions: consuming, dedup, transactions, offsets, retries and dead
    letters, what it counts in ``progress`` (and in ``registry``, with metrics on), whether the
    broker answers (``broker``) and the client's log lines (``client_log``). ``clock`` times
    the transactions and the wait for a broker; ``rand`` jitters the retries."""

    def __init__(
        self,
        settings: ConsumerSettings,
        message_id: MessageId,
        registry: CollectorRegistry | None = None,
        *,
        clock: Callable[[], float] = time.perf_counter,
        rand: Callable[[], float] = random.random,
    ) -> None:
        self.settings = settings
        self.message_id = message_id
        self.registry = metrics_registry(settings.metrics_port, registry)
        self.progress = Progress(settings.name, settings.topics, self.registry)
        self.broker = BrokerWatch(settings, BrokerGauge(settings.name, self.registry), clock)
        #: The ``logger`` of the loop's Kafka clients; :meth:`kafka_error` is their ``error_cb``.
        self.client_log = ClientLog()
        self._clock = clock
        self._rand = rand

    def started(self) -> None:
        """The loop subscribed."""
        log.info("consumer.started", consumer=self.settings.name, topics=list(self.settings.topics))
        self.broker.start()

    def stopped(self) -> None:
        """The loop closed its clients."""
        self.broker.stop()
        self.client_log.summary()
        log.info("consumer.stopped", consumer=self.settings.name, **vars(self.progress.stats))

    def kafka_error(self, error: KafkaError) -> None:
        """The consumer's ``error_cb``: logged (thinned), and whether a broker is up."""
        self.client_log.error(error)
        self.broker.reported(error)

    def step(self) -> Steps[bool]:
        """One turn of the loop: see whether a broker answers (when that is in doubt), consume
        a batch and process it. False: the loop must stop."""
        yield from self._probe()
        batch: list[Message] = yield Consume(self.settings.batch_size, self.settings.poll_timeout)
        messages = [m for m in batch if usable(m, self.client_log)]
        if not messages:
            return True
        self.broker.answered()
        if self.progress.enabled:
            yield from self._see_watermarks(messages)
        return (yield from self._process(messages))

    def transaction(self, command: Transact) -> TransactionSteps[Split]:
        """Inside the transaction of ``command``: claim the ids (a plain insert for one), then
        hand the new messages to the handler. Returns (handled, skipped as duplicates)."""
        messages, ids = command.messages, command.ids
        new: set[str] | None = None  # no deduplication: every message is new
        if self.settings.deduplicate and len(ids) == 1:
            new = set(ids) if (yield ClaimOne(ids[0])) else set()
        elif self.settings.deduplicate:
            new = yield ClaimMany(ids)
        claimed = self.claimed(messages, ids, new)
        if claimed.messages:
            yield Handle(claimed.messages, claimed.ids)
        return claimed.split

    def claimed(self, messages: list[Message], ids: list[str], new: set[str] | None) -> Claimed:
        """Which messages the handler gets, once their ids are claimed (``new``: the ids claimed
        now; None without deduplication). The others are logged."""
        if new is None:
            return Claimed(messages, ids, [])
        fresh, skipped = first_copies(messages, ids, new)
        for message, message_id in skipped:
            log.info("consumer.duplicate_skipped", message_id=message_id, origin=origin_of(message))
        return Claimed([m for m, _ in fresh], [i for _, i in fresh], [m for m, _ in skipped])

    def assigned(self, partitions: list[TopicPartition]) -> Steps[None]:
        """With metrics, where the lag of the new partitions starts: the committed offsets."""
        if not self.progress.enabled:
            return
        try:
            partitions = yield Committed(partitions)
        except KafkaException as exc:  # unknown: the lag starts at the first store
            log.warning("consumer.committed_unknown", error=str(exc))
        self.progress.lag.assigned(partitions)

    def revoked(self, partitions: list[TopicPartition]) -> Steps[None]:
        """Commit what is done before the partitions go to another consumer."""
        self.progress.lag.revoked(partitions)
        try:
            yield Commit()
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("consumer.commit_failed", error=str(exc))

    def _probe(self) -> Steps[None]:
        timeout = self.broker.probe_due()
        if timeout is None:
            return
        try:
            yield Probe(timeout)
        except KafkaException as exc:
            self.broker.unanswered(exc.args[0])  # raises at start, past connect_timeout
        else:
            self.broker.answered()

    def _process(self, messages: list[Message]) -> Steps[bool]:
        """In order; each offset stored once its transaction committed. False: stop."""
        if len(messages) > 1 and (yield from self._in_one_transaction(messages)):
            yield from self._store(next_offsets(messages))
            return True
        for message in messages:
            if not (yield from self._one_by_one(message)):
                return False
            yield from self._store(next_offsets([message]))
        return True

    def _see_watermarks(self, messages: list[Message]) -> Steps[None]:
        """Note the high watermarks of the batch's partitions (local reads, for the lag)."""
        for topic, partition in partitions_of(messages):
            _, high = (yield Watermarks(TopicPartition(topic, partition))) or (-1, -1)
            self.progress.lag.seen(topic, partition, high)

    def _store(self, offsets: list[TopicPartition]) -> Steps[None]:
        yield Store(offsets)
        self.progress.lag.stored(offsets)

    def _in_one_transaction(self, messages: list[Message]) -> Steps[bool]:
        """The whole batch in one transaction; False when it failed (to be replayed one by one)."""
        started = self._clock()
        try:
            split: Split = yield Transact(messages, [self.message_id(m) for m in messages])
        except Exception as exc:  # the handler's own errors: replay one by one
            log.info("consumer.batch_failed", size=len(messages), error=repr(exc))
            self.progress.batch_replayed()
            return False
        self.progress.committed(*split, self._clock() - started)
        return True

    def _one_by_one(self, message: Message) -> Steps[bool]:
        """One message, tried ``max_attempts`` times, then dead-lettered. False: stopping."""
        error: Exception | None = None
        for attempt in range(self.settings.max_attempts):
            started = self._clock()
            try:
                split: Split = yield Transact([message], [self.message_id(message)])
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
                if not last and (yield Wait(self._delay(attempt))):
                    return False  # stopping: the message stays unacknowledged
                continue
            self.progress.committed(*split, self._clock() - started)
            return True
        assert error is not None
        yield DeadLetter(message, error)
        self.progress.dead_lettered(message)
        return True

    def _delay(self, attempt: int) -> float:
        settings = self.settings
        return full_jitter(
            attempt, base=settings.backoff_base, cap=settings.backoff_cap, rand=self._rand
        )
