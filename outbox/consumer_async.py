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
import functools
import signal
import threading
from collections.abc import AsyncIterator, Awaitable, Callable, Generator, Sequence
from typing import Any, Generic, TypeVar, assert_never

import psycopg
import structlog
from confluent_kafka import KafkaError, Message, TopicPartition
from confluent_kafka.aio import AIOConsumer
from prometheus_client import CollectorRegistry

from outbox import dedup, tracing
from outbox.consumer import (
    ConsumerSettings,
    DeadLetterTopic,
    MessageId,
    batch_span_attributes,
    consumer_config,
    event_id_or_position,
    header_pairs,
    message_span_attributes,
    serving,
)
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
)
from outbox.consumer_metrics import ConsumeStats

log = structlog.get_logger("outbox.consumer")

AsyncHandler = Callable[[Any, Message], Awaitable[None]]
AsyncBatchHandler = Callable[[Any, Sequence[Message]], Awaitable[None]]
H = TypeVar("H", AsyncHandler, AsyncBatchHandler)
T = TypeVar("T")
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
    """The loop around its handler, awaiting: it carries out the commands of its
    :class:`~outbox.consumer_core.ConsumeCore`, as :class:`outbox.consumer._Loop` does blocking."""

    def __init__(
        self,
        settings: ConsumerSettings,
        handler: H,
        transactions: Callable[[], Any],
        *,
        message_id: MessageId = event_id_or_position,
        registry: CollectorRegistry | None = None,
    ) -> None:
        """:param settings: where to read, and how to retry, dead-letter and deduplicate.
        :param handler: ``await handler(db, message)`` (the batch loop: ``await handler(db,
            messages)``), called inside the transaction that holds the dedup claim; it must
            not commit.
        :param transactions: where each transaction comes from: an ``async_sessionmaker`` (or
            any callable returning an ``AsyncSession``), or a callable returning what yields a
            psycopg ``AsyncConnection`` (``pool.connection`` of an ``AsyncConnectionPool``).
        :param message_id: the id the dedup table records; by default the relay's ``event_id``
            header, else topic/partition/offset.
        :param registry: a Prometheus registry to record the loop's metrics into.
        """
        self.settings = settings
        self.handler: H = handler
        self.transactions = transactions
        self.core = ConsumeCore(settings, message_id, registry)
        self.dead_letters = DeadLetterTopic(settings, self.core.client_log)
        self._stopping = asyncio.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._consumer: AIOConsumer | None = None
        self.stop_reason = ""

    @property
    def stats(self) -> ConsumeStats:
        return self.core.progress.stats

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
        close_metrics = serving(self.settings, self.core.registry)  # first: it may refuse its port
        installed = self._install_signals() if handle_signals else []
        try:
            config = {
                **consumer_config(self.settings),
                "logger": self.core.client_log,
                "error_cb": self._on_kafka_error,  # AIOConsumer awaits it on this event loop
            }
            self._consumer = AIOConsumer(config, max_workers=2)
            await self._consumer.subscribe(
                list(self.settings.topics), on_assign=self._on_assign, on_revoke=self._on_revoke
            )
            self.core.started()
            running = True
            while running and not self._stopping.is_set():
                running = await self._drive(self.core.step(), self._perform)
        finally:
            for sig in installed:
                self._loop.remove_signal_handler(sig)
            if self._consumer is not None:
                await self._consumer.close()  # commits the stored offsets
                self._consumer = None
            await asyncio.to_thread(self.dead_letters.flush)
            close_metrics()
            self.core.stopped()

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

    async def _drive(
        self, steps: Generator[C, Any, T], perform: Callable[[C], Awaitable[object]]
    ) -> T:
        """Carry out the core's steps with ``perform``, awaiting; what they returned."""
        run = Run(steps)
        while run.command is not None:
            try:
                reply = await perform(run.command)
            except Exception as exc:  # raised in the step that asked
                run.fail(exc)
            else:
                run.answer(reply)
        return run.result

    async def _perform(self, command: Command) -> object:
        consumer = self._consumer
        assert consumer is not None
        match command:
            case Consume(size, timeout):
                return await consumer.consume(size, timeout)
            case Probe(timeout):
                await consumer.list_topics(timeout=timeout)
                return None
            case Transact():
                return await self._transact(command)
            case Store(offsets):
                return await consumer.store_offsets(offsets=offsets)
            case Wait(seconds):
                return await self._stopped_within(seconds)
            case DeadLetter(message, error):
                return await asyncio.to_thread(self.dead_letters.send, message, error)
            case Watermarks(partition):
                return await consumer.get_watermark_offsets(partition, cached=True)
            case Committed(partitions):
                return await consumer.committed(partitions, timeout=10)
            case Commit():
                return await consumer.commit(asynchronous=False)
        assert_never(command)

    async def _transact(self, command: Transact) -> Split:
        async with transaction(self.transactions) as db:
            steps = self.core.transaction(command)
            return await self._drive(steps, functools.partial(self._in_transaction, db))

    async def _in_transaction(self, db: Any, command: InTransaction) -> object:
        name, outbox = self.settings.name, self.settings.outbox
        match command:
            case ClaimOne(message_id):
                return await dedup.claim_async(db, name, message_id, settings=outbox)
            case ClaimMany(ids):
                return await dedup.claim_many_async(db, name, ids, settings=outbox)
            case Handle(messages, ids):
                await self._handle_new(db, messages, ids)
                return None
        assert_never(command)

    async def _handle_new(self, db: Any, messages: list[Message], ids: list[str]) -> None:
        raise NotImplementedError

    async def _stopped_within(self, seconds: float) -> bool:
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(self._stopping.wait(), seconds)
        return self._stopping.is_set()

    async def _on_kafka_error(self, error: KafkaError) -> None:
        self.core.kafka_error(error)

    async def _on_assign(self, _consumer: AIOConsumer, partitions: list[TopicPartition]) -> None:
        await self._drive(self.core.assigned(partitions), self._perform)

    async def _on_revoke(self, _consumer: AIOConsumer, partitions: list[TopicPartition]) -> None:
        await self._drive(self.core.revoked(partitions), self._perform)


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
