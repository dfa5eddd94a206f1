"""outbox.consumer_async: AsyncConsumeLoop and AsyncBatchConsumeLoop against a real PostgreSQL
and Kafka-protocol broker, with the guarantees of the sync loops (tests/integration/
test_consumer.py, whose helpers these reuse): duplicates skipped through the dedup table in the
handler's transaction, retries then the dead-letter topic, the loop stopping rather than
skipping, and cancellation rolling the transaction in hand back.

Each loop runs as a task of the test's event loop and is stopped with ``loop.stop()``.
"""

from __future__ import annotations

import asyncio
import contextlib
import time
import uuid
from collections import Counter
from collections.abc import AsyncIterator, Callable, Sequence
from typing import Any

import psycopg
import pytest
import pytest_asyncio
from confluent_kafka import Message
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

from outbox import urls
from outbox.consumer import ATTEMPTS_HEADER, ERROR_HEADER, ConsumerStopped, header_pairs
from outbox.consumer_async import AsyncBatchConsumeLoop, AsyncConsumeLoop, _AsyncLoop
from tests.acceptance.relay_harness import create_topic
from tests.integration.test_consumer import (
    WAIT,
    Poison,
    committed_offset,
    dedup_ids,
    effect_rows,
    effects,  # noqa: F401 - the side-effect table fixture
    payload_counts,
    produce,
    read_all,
    settings,
    unique_name,
)

pytestmark = pytest.mark.kafka

INSERT = "INSERT INTO effects VALUES (%s, %s, %s, %s)"


def effect_params(message: Message) -> tuple[str, str, int, int]:
    value = message.value()
    assert value is not None
    event_id = dict(header_pairs(message)).get("event_id")
    message_id = event_id.decode() if isinstance(event_id, bytes) else "?"
    return (message_id, value.decode(), message.partition() or 0, message.offset() or 0)


async def record(db: Any, message: Message) -> None:
    """The side effect, on an AsyncSession or a psycopg AsyncConnection."""
    if isinstance(db, AsyncSession):
        db = await db.connection()
        await db.exec_driver_sql(INSERT, effect_params(message))
    else:
        await db.execute(INSERT, effect_params(message))


async def until(predicate: Callable[[], bool]) -> None:
    async with asyncio.timeout(WAIT):
        while not predicate():  # noqa: ASYNC110 - the stats have no event to wait on
            await asyncio.sleep(0.05)


def seen(loop: _AsyncLoop[Any]) -> int:
    stats = loop.stats
    return stats.processed + stats.duplicates + stats.dead_lettered


@contextlib.asynccontextmanager
async def running(loop: _AsyncLoop[Any]) -> AsyncIterator[asyncio.Task[None]]:
    """The loop as a task for the block; stopped after it, and it must not have failed."""
    task = asyncio.create_task(loop.run(handle_signals=False))
    try:
        yield task
    finally:
        loop.stop()
        await asyncio.wait_for(asyncio.shield(task), 30)


@pytest_asyncio.fixture
async def sessions(database_url: str) -> AsyncIterator[async_sessionmaker[AsyncSession]]:
    engine = create_async_engine(urls.to_sqlalchemy(database_url))
    yield async_sessionmaker(engine)
    await engine.dispose()


@pytest.mark.asyncio
@pytest.mark.parametrize("batch_size", [1, 50])
@pytest.mark.parametrize("db_kind", ["AsyncSession", "psycopg AsyncConnection"])
async def test_a_message_delivered_twice_has_its_side_effect_once(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    kafka_bootstrap: str,
    topic: str,
    effects: str,  # noqa: F811
    batch_size: int,
    db_kind: str,
) -> None:
    """One message at a time or in one batch, on either kind of transaction: the side effect
    of an event id delivered twice happens once."""
    name = unique_name()
    twice, once = str(uuid.uuid4()), str(uuid.uuid4())
    produce(kafka_bootstrap, topic, [("order-1", twice), ("order-2", once), ("order-1", twice)])
    transactions: Callable[[], Any] = (
        sessions
        if db_kind == "AsyncSession"
        else (lambda: psycopg.AsyncConnection.connect(database_url))
    )
    config = settings(name, topic, kafka_bootstrap, batch_size=batch_size)
    loop = AsyncConsumeLoop(config, record, transactions)
    async with running(loop):
        await until(lambda: seen(loop) >= 3)
        await asyncio.sleep(0.5)  # anything more would be a bug; give it a chance to show
    assert (loop.stats.processed, loop.stats.duplicates) == (2, 1)
    assert payload_counts(database_url) == Counter({"order-1": 1, "order-2": 1})
    assert dedup_ids(database_url, name) == {twice, once}


@pytest.mark.asyncio
async def test_the_batch_handler_gets_each_new_message_once_in_order(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    kafka_bootstrap: str,
    effects: str,  # noqa: F811
) -> None:
    topic = create_topic(kafka_bootstrap, partitions=1)
    ids = [str(uuid.uuid4()) for _ in range(20)]
    produce(kafka_bootstrap, topic, [(f"m{i}", ids[i]) for i in range(20)] + [("m3", ids[3])])
    calls: list[list[str]] = []

    async def handle(session: AsyncSession, messages: Sequence[Message]) -> None:
        calls.append([(m.value() or b"").decode() for m in messages])
        for message in messages:
            await record(session, message)

    config = settings(unique_name(), topic, kafka_bootstrap, batch_size=50)
    loop = AsyncBatchConsumeLoop(config, handle, sessions)
    async with running(loop):
        await until(lambda: seen(loop) >= 21)
    handed = [payload for call in calls for payload in call]
    assert handed == [f"m{i}" for i in range(20)]
    assert payload_counts(database_url) == Counter({f"m{i}": 1 for i in range(20)})
    assert loop.stats.duplicates == 1


@pytest.mark.asyncio
async def test_a_failing_message_is_retried_then_dead_lettered_and_the_rest_go_on(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    kafka_bootstrap: str,
    effects: str,  # noqa: F811
) -> None:
    """A batch with a poison message is replayed one by one: the others are handled once, the
    poison one is tried max_attempts times (nothing of it commits) and dead-lettered with the
    error in its headers; the loop carries on."""
    topic = create_topic(kafka_bootstrap, partitions=1)
    dead = create_topic(kafka_bootstrap, partitions=1)
    produce(kafka_bootstrap, topic, [("ok-1", None), ("poison", None), ("ok-2", None)])

    async def handle(session: AsyncSession, message: Message) -> None:
        await record(session, message)
        if message.value() == b"poison":
            raise Poison("cannot bill this")

    config = settings(unique_name(), topic, kafka_bootstrap, batch_size=10, dead_letter_topic=dead)
    loop = AsyncConsumeLoop(config, handle, sessions)
    async with running(loop):
        await until(lambda: seen(loop) >= 3)
    assert payload_counts(database_url) == Counter({"ok-1": 1, "ok-2": 1})
    assert (loop.stats.failures, loop.stats.dead_lettered) == (3, 1)
    [letter] = await asyncio.to_thread(read_all, kafka_bootstrap, dead, 1)
    headers = dict(header_pairs(letter))
    assert letter.value() == b"poison"
    assert b"cannot bill this" in (headers[ERROR_HEADER] or b"")
    assert headers[ATTEMPTS_HEADER] == b"3"


@pytest.mark.asyncio
async def test_without_a_dead_letter_topic_the_loop_stops_and_keeps_the_offset(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    kafka_bootstrap: str,
    effects: str,  # noqa: F811
) -> None:
    topic = create_topic(kafka_bootstrap, partitions=1)
    produce(kafka_bootstrap, topic, [("ok", None), ("poison", None)], partition=0)

    async def handle(session: AsyncSession, message: Message) -> None:
        if message.value() == b"poison":
            raise Poison("no")
        await record(session, message)

    name = unique_name()
    loop = AsyncConsumeLoop(settings(name, topic, kafka_bootstrap), handle, sessions)
    with pytest.raises(ConsumerStopped, match="no dead-letter topic"):
        await asyncio.wait_for(loop.run(handle_signals=False), WAIT)
    assert payload_counts(database_url) == Counter({"ok": 1})
    assert committed_offset(kafka_bootstrap, name, topic, 0) == 1  # the poison one is next


@pytest.mark.asyncio
async def test_a_cancelled_loop_rolls_back_the_message_in_hand_and_it_comes_again(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    kafka_bootstrap: str,
    effects: str,  # noqa: F811
) -> None:
    """Cancel the task while the handler is inside its transaction: nothing of it commits, the
    offset is not stored, and a new loop of the same group handles the message once."""
    topic = create_topic(kafka_bootstrap, partitions=1)
    produce(kafka_bootstrap, topic, [("first", str(uuid.uuid4()))])
    name = unique_name()
    entered = asyncio.Event()

    async def hang(session: AsyncSession, message: Message) -> None:
        await record(session, message)
        entered.set()
        await asyncio.sleep(3600)

    loop = AsyncConsumeLoop(settings(name, topic, kafka_bootstrap), hang, sessions)
    task = asyncio.create_task(loop.run(handle_signals=False))
    await asyncio.wait_for(entered.wait(), WAIT)
    task.cancel()
    with pytest.raises(asyncio.CancelledError):
        await asyncio.wait_for(task, 30)
    assert effect_rows(database_url) == []
    assert dedup_ids(database_url, name) == set()

    again = AsyncConsumeLoop(settings(name, topic, kafka_bootstrap), record, sessions)
    async with running(again):
        await until(lambda: seen(again) >= 1)
    assert payload_counts(database_url) == Counter({"first": 1})


@pytest.mark.asyncio
async def test_a_handler_that_fails_once_then_succeeds(
    database_url: str,
    sessions: async_sessionmaker[AsyncSession],
    kafka_bootstrap: str,
    topic: str,
    effects: str,  # noqa: F811
) -> None:
    produce(kafka_bootstrap, topic, [("flaky", str(uuid.uuid4()))])
    attempts: list[float] = []

    async def flaky(session: AsyncSession, message: Message) -> None:
        attempts.append(time.monotonic())
        await record(session, message)  # rolled back with the first attempt
        if len(attempts) == 1:
            raise Poison("once")

    loop = AsyncConsumeLoop(settings(unique_name(), topic, kafka_bootstrap), flaky, sessions)
    async with running(loop):
        await until(lambda: loop.stats.processed >= 1)
    assert payload_counts(database_url) == Counter({"flaky": 1})
    assert (loop.stats.failures, len(attempts)) == (1, 2)


def test_transactions_of_the_wrong_kind_are_named() -> None:
    from outbox.consumer_async import transaction

    @contextlib.asynccontextmanager
    async def not_a_connection() -> AsyncIterator[object]:
        yield object()

    async def use() -> None:
        async with transaction(not_a_connection):
            pass

    with pytest.raises(TypeError, match="AsyncSession or yield a psycopg AsyncConnection"):
        asyncio.run(use())
