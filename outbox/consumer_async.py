"""The consume loops for asyncio services, on confluent-kafka's ``AIOConsumer``.

The same guarantees as :mod:`outbox.consumer`: for every message (or batch), one database
transaction holds the dedup claim and the handler's side effects, and the Kafka offset is stored
only after it committed; a handler that raises is retried with jittered backoff, then the message
goes to the dead-letter topic (or the loop stops); a failing batch is replayed one message at a
time. The handler is a coroutine function::

    async def bill(session: AsyncSession, message: Message) -> None:
        order = json.loads(message.value())
        session.add(Invoice(order_id=order["order_id"], total=order["total"]))

    loop = AsyncConsumeLoop(ConsumerSettings("billing", ["orders.placed"], "kafka:9092"),
                            bill, async_sessionmaker(engine))
    await loop.run()    # until SIGTERM / SIGINT, loop.stop(), or the task is cancelled

``transactions`` says where each transaction comes from: an ``async_sessionmaker`` (or any
callable returning an ``AsyncSession``), or a callable returning what yields a psycopg
``AsyncConnection``: ``pool.connection`` of a ``psycopg_pool.AsyncConnectionPool``, or
``lambda: psycopg.AsyncConnection.connect(url)``. The handler gets that session or connection.

Cancelling the task that runs the loop rolls back the transaction in hand; its message was not
acknowledged, so it is delivered again after the restart (and recognised if it had committed).
"""

from __future__ import annotations

import asyncio
import contextlib
import signal
import threading
import time
from collections.abc import AsyncIterator, Awaitable, Callable, Sequence
from typing import Any, Generic, TypeVar

import psycopg
import structlog
from confluent_kafka import KafkaError, KafkaException, Message, TopicPartition
from confluent_kafka.aio import AIOConsumer
from prometheus_client import CollectorRegistry

from outbox import dedup, tracing
from outbox.backoff import full_jitter
from outbox.consumer import (
    ConsumerSettings,
    DeadLetterTopic,
    Split,
    batch_span_attributes,
    consumer_config,
    event_id_or_position,
    first_copies,
    header_pairs,
    message_span_attributes,
    next_offsets,
    one_split,
    origin_of,
    serving,
    usable,
)
from outbox.consumer_metrics import ConsumeStats, Progress, metrics_registry, partitions_of

log = structlog.get_logger("outbox.consumer")

AsyncHandler = Callable[[Any, Message], Awaitable[None]]
AsyncBatchHandler = Callable[[Any, Sequence[Message]], Awaitable[None]]
MessageId = Callable[[Message], str]
H = TypeVar("H", AsyncHandler, AsyncBatchHandler)
_SIGNALS = (signal.SIGTERM, signal.SIGINT)


@contextlib.asynccontextmanager
async def transaction(transactions: Callable[[], Any]) -> AsyncIterator[Any]:
    """One transaction from ``transactions`` (see the module's docstring): committed when the
    block ends, rolled back when it raises (or is cancelled)."""
    made = transactions()
    if hasattr(made, "begin") and hasattr(made, "sync_session"):  # an AsyncSession
        async with made as session, session.begin():
            yield session
        return
    if isinstance(made, Awaitable) and not hasattr(made, "__aenter__"):
        made = await made  # AsyncConnection.connect(...)
    async with made as conn:
        if not isinstance(conn, psycopg.AsyncConnection):
            raise TypeError(
                "transactions must return an AsyncSession or yield a psycopg AsyncConnection, "
                f"got {type(conn).__name__}"
            )
        async with conn.transaction():
            yield conn


class _AsyncLoop(Generic[H]):
    """The loop around its handler, as :class:`outbox.consumer._Loop` but awaiting."""

    def __init__(
        self,
        settings: ConsumerSettings,
        handler: H,
        transactions: Callable[[], Any],
        *,
        message_id: MessageId = event_id_or_position,
        registry: CollectorRegistry | None = None,
    ) -> None:
        self.settings = settings
        self.handler: H = handler
        self.transactions = transactions
        self.message_id = message_id
        self.registry = metrics_registry(settings.metrics_port, registry)
        self.progress = Progress(settings.name, settings.topics, self.registry)
        self.dead_letters = DeadLetterTopic(settings)
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self.stop_reason = ""

    @property
    def stats(self) -> ConsumeStats:
        return self.progress.stats

    def stop(self, reason: str = "stop()") -> None:
        """Ask the loop to stop after the message in hand (from any thread)."""
        self.stop_reason = self.stop_reason or reason
        if self._loop is not None and self._loop.is_running():
            self._loop.call_soon_threadsafe(self._stopping.set)
        else:
            self._stopping.set()

    async def run(self, *, handle_signals: bool = True) -> None:
        """Consume until :meth:`stop`, SIGTERM/SIGINT (when ``handle_signals``), cancellation,
        or a message that can be neither processed nor dead-lettered (``ConsumerStopped``)."""
        self._loop = asyncio.get_running_loop()
        close_metrics = serving(self.settings, self.registry)  # first: it may refuse its port
        installed = self._install_signals() if handle_signals else []
        consumer: AIOConsumer | None = None
        try:
            consumer = AIOConsumer(consumer_config(self.settings), max_workers=2)
            await consumer.subscribe(
                list(self.settings.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            log.info(
                "consumer.started", consumer=self.settings.name, topics=list(self.settings.topics)
            )
            while not self._stopping.is_set():
                batch = await consumer.consume(self.settings.batch_size, self.settings.poll_timeout)
                messages = [m for m in batch if usable(m)]
                if messages and self.progress.enabled:
                    await self._see_watermarks(consumer, messages)
                if messages and not await self._process(consumer, messages):
                    break
        finally:
            for sig in installed:
                self._loop.remove_signal_handler(sig)
            if consumer is not None:
                await consumer.close()  # commits the stored offsets
            await asyncio.to_thread(self.dead_letters.flush)
            close_metrics()
            log.info("consumer.stopped", consumer=self.settings.name, **vars(self.stats))

    def _install_signals(self) -> list[signal.Signals]:
        if threading.current_thread() is not threading.main_thread():
            log.warning(
                "consumer.signals_not_handled",
                reason="not on the main thread; call stop() to end the loop",
            )
            return []
        assert self._loop is not None
        for sig in _SIGNALS:
            self._loop.add_signal_handler(sig, self._on_signal, sig)
        return list(_SIGNALS)

    def _on_signal(self, sig: signal.Signals) -> None:
        log.info("consumer.stop_requested", signal=sig.name, again=self._stopping.is_set())
        self.stop(sig.name)

    async def _process(self, consumer: AIOConsumer, messages: list[Message]) -> bool:
        """Process in order; store each offset once its transaction committed. False: stop."""
        if len(messages) > 1 and await self._in_one_transaction(messages):
            await self._store(consumer, next_offsets(messages))
            return True
        for message in messages:
            if not await self._one_by_one(message):
                return False
            await self._store(consumer, next_offsets([message]))
        return True

    async def _see_watermarks(self, consumer: AIOConsumer, messages: list[Message]) -> None:
        """Note the high watermarks of the batch's partitions (local reads, for the lag)."""
        for topic, partition in partitions_of(messages):
            _, high = await consumer.get_watermark_offsets(
                TopicPartition(topic, partition), cached=True
            ) or (-1, -1)
            self.progress.lag.seen(topic, partition, high)

    async def _store(self, consumer: AIOConsumer, offsets: list[TopicPartition]) -> None:
        await consumer.store_offsets(offsets=offsets)
        self.progress.lag.stored(offsets)

    async def _handle_new(self, db: Any, messages: list[Message], ids: list[str]) -> None:
        raise NotImplementedError

    async def _in_one_transaction(self, messages: list[Message]) -> bool:
        started = time.perf_counter()
        try:
            async with transaction(self.transactions) as db:
                fresh, skipped = await self._apply_batch(db, messages)
        except Exception as exc:  # the handler's own errors: replay one by one
            log.info("consumer.batch_failed", size=len(messages), error=repr(exc))
            self.progress.batch_replayed()
            return False
        self.progress.committed(fresh, skipped, time.perf_counter() - started)
        return True

    async def _apply_batch(self, db: Any, messages: list[Message]) -> Split:
        ids = [self.message_id(message) for message in messages]
        if not self.settings.deduplicate:
            await self._handle_new(db, messages, ids)
            return messages, []
        new = await dedup.claim_many_async(
            db, self.settings.name, ids, settings=self.settings.outbox
        )
        fresh, skipped = first_copies(messages, ids, new)
        for message, message_id in skipped:
            log.info("consumer.duplicate_skipped", message_id=message_id, origin=origin_of(message))
        handled = [m for m, _ in fresh]
        if handled:
            await self._handle_new(db, handled, [i for _, i in fresh])
        return handled, [m for m, _ in skipped]

    async def _apply(self, db: Any, message: Message) -> bool:
        message_id = self.message_id(message)
        if self.settings.deduplicate and not await dedup.claim_async(
            db, self.settings.name, message_id, settings=self.settings.outbox
        ):
            log.info("consumer.duplicate_skipped", message_id=message_id, origin=origin_of(message))
            return False
        await self._handle_new(db, [message], [message_id])
        return True

    async def _one_by_one(self, message: Message) -> bool:
        error: Exception | None = None
        for attempt in range(self.settings.max_attempts):
            started = time.perf_counter()
            try:
                async with transaction(self.transactions) as db:
                    applied = await self._apply(db, message)
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
                if not last and await self._stopped_within(self._delay(attempt)):
                    return False  # stopping: the message stays unacknowledged
                continue
            self.progress.committed(*one_split(message, applied), time.perf_counter() - started)
            return True
        assert error is not None
        await asyncio.to_thread(self.dead_letters.send, message, error)
        self.progress.dead_lettered(message)
        return True

    def _delay(self, attempt: int) -> float:
        return full_jitter(attempt, base=self.settings.backoff_base, cap=self.settings.backoff_cap)

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _on_assign(self, consumer: AIOConsumer, partitions: list[TopicPartition]) -> None:
        """With metrics, where the lag of the new partitions starts: the committed offsets."""
        if self.progress.enabled:
            try:
                partitions = await consumer.committed(partitions, timeout=10)
            except KafkaException as exc:
                log.warning("consumer.committed_unknown", error=str(exc))
            self.progress.lag.assigned(partitions)

    async def _on_revoke(self, consumer: AIOConsumer, partitions: list[TopicPartition]) -> None:
        """Commit what is done before the partitions go to another consumer."""
        self.progress.lag.revoked(partitions)
        try:
            await consumer.commit(asynchronous=False)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError._NO_OFFSET:
                log.warning("consumer.commit_failed", error=str(exc))


class AsyncConsumeLoop(_AsyncLoop[AsyncHandler]):
    """The async consume loop with a handler awaited once per message, each inside a CONSUMER
    span that continues the trace of the message (with OpenTelemetry)."""

    async def _handle_new(self, db: Any, messages: list[Message], ids: list[str]) -> None:
        for message, message_id in zip(messages, ids, strict=True):
            if not tracing.available():
                await self.handler(db, message)
                continue
            attributes = message_span_attributes(self.settings, message, message_id)
            with tracing.consuming(message.topic() or "", header_pairs(message), attributes):
                await self.handler(db, message)


class AsyncBatchConsumeLoop(_AsyncLoop[AsyncBatchHandler]):
    """The async consume loop with a handler awaited once per transaction with all of its new
    messages (duplicates already left out), in the order consumed; with OpenTelemetry, inside
    one CONSUMER span linked to the trace of each message."""

    async def _handle_new(self, db: Any, messages: list[Message], ids: list[str]) -> None:
        if not tracing.available():
            await self.handler(db, messages)
            return
        topic, attributes = batch_span_attributes(self.settings, messages)
        with tracing.consuming_batch(topic, map(header_pairs, messages), attributes):
            await self.handler(db, messages)
