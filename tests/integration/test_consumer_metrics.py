"""The consume loops' Prometheus metrics (``ConsumerSettings.metrics_port``), scraped over HTTP
from the four loops running against the real PostgreSQL and broker: the counters say what the
loop did (the same figures as ``loop.stats``, by topic), and the lag gauge rises while the
handler is held and returns to 0 once the loop caught up.
"""

from __future__ import annotations

import asyncio
import threading
import urllib.request
import uuid
from collections import defaultdict
from collections.abc import Callable, Sequence
from typing import Any

import pytest
import sqlalchemy as sa
from confluent_kafka import Message
from prometheus_client.parser import text_string_to_metric_families
from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker
from sqlalchemy.orm import Session, sessionmaker

from outbox import testing
from outbox.consumer import BatchConsumeLoop, ConsumeLoop, ConsumerSettings
from outbox.consumer_async import AsyncBatchConsumeLoop, AsyncConsumeLoop
from tests.acceptance.relay_harness import create_topic, wait_until
from tests.integration.test_consumer import (
    KAFKA_CONFIG,
    WAIT,
    Poison,
    Running,
    effects,  # noqa: F401 - the side-effect table fixture
    produce,
    record,
    settings,
    unique_name,
)
from tests.integration.test_consumer_async import record as record_async
from tests.integration.test_consumer_async import (
    sessions,  # noqa: F401 - the async sessionmaker fixture
    until,
)

pytestmark = pytest.mark.kafka

Samples = dict[str, dict[tuple[tuple[str, str], ...], float]]


def scrape(port: int, consumer: str) -> Samples:
    """Sample name -> {labels but consumer: value}, for one consumer's samples."""
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        body = response.read().decode()
    samples: Samples = defaultdict(dict)
    for family in text_string_to_metric_families(body):
        for sample in family.samples:
            labels = dict(sample.labels)
            if labels.pop("consumer", None) == consumer:
                samples[sample.name][tuple(sorted(labels.items()))] = sample.value
    return samples


def lag(port: int, consumer: str, topic: str) -> float | None:
    """The lag gauge of partition 0, or None while the loop has not reported it."""
    values = scrape(port, consumer)["outbox_consumer_lag_messages"]
    return values.get((("partition", "0"), ("topic", topic)))


class Scenario:
    """One partition: ``ok-0`` alone first, then ``ok-1`` (held by the handler until released),
    ``ok-2``, ``poison`` (always fails), ``ok-3`` and ``ok-0`` again (a duplicate)."""

    def __init__(self, bootstrap: str, *, batch_size: int) -> None:
        self.name = unique_name()
        self.topic = create_topic(bootstrap, partitions=1)
        self.dead = create_topic(bootstrap, partitions=1)
        self.bootstrap = bootstrap
        self.port = testing.free_port()
        self.ids = {p: str(uuid.uuid4()) for p in ("ok-0", "ok-1", "ok-2", "poison", "ok-3")}
        self.held, self.released = threading.Event(), threading.Event()
        self.settings: ConsumerSettings = settings(
            self.name,
            self.topic,
            bootstrap,
            batch_size=batch_size,
            dead_letter_topic=self.dead,
            metrics_port=self.port,
            metrics_host="127.0.0.1",
            kafka_config=KAFKA_CONFIG,
        )

    def produce_first(self) -> None:
        produce(self.bootstrap, self.topic, [("ok-0", self.ids["ok-0"])], partition=0)

    def produce_rest(self) -> None:
        rest = ["ok-1", "ok-2", "poison", "ok-3"]
        produce(self.bootstrap, self.topic, [(p, self.ids[p]) for p in rest], partition=0)
        produce(self.bootstrap, self.topic, [("ok-0", self.ids["ok-0"])], partition=0)

    def check(self, handled: Callable[[], int]) -> None:
        """What the scrape says after the loop finished all six messages. The lag alone cannot
        say when that is: it compares with the high watermark of the last fetch, so it reads 0
        between a fetch and the next one (Apache Kafka hands the duplicate over in a fetch of
        its own; Tansu's watermark lag hid that)."""
        topic = (("topic", self.topic),)

        def finished() -> float:
            totals = scrape(self.port, self.name)
            return sum(
                totals[f"outbox_consumer_{name}_total"][topic]
                for name in ("messages_processed", "duplicates_skipped", "dead_lettered")
            )

        wait_until(lambda: finished() == 6, timeout=WAIT)
        wait_until(lambda: lag(self.port, self.name, self.topic) == 0, timeout=WAIT)
        samples = scrape(self.port, self.name)

        def count(name: str) -> float:
            return samples[f"outbox_consumer_{name}_total"][topic]

        assert count("messages_processed") == 4 == handled()  # ok-0 to ok-3
        assert count("duplicates_skipped") == 1
        assert count("handler_failures") == 3  # max_attempts
        assert count("handler_retries") == 2
        assert count("dead_lettered") == 1
        transactions = samples["outbox_consumer_batch_duration_seconds_count"][()]
        assert transactions >= 3, transactions
        if self.settings.batch_size > 1:
            assert samples["outbox_consumer_batches_replayed_total"][()] >= 1
        assert "process_resident_memory_bytes" in scrape_names(self.port)


def scrape_names(port: int) -> set[str]:
    url = f"http://127.0.0.1:{port}/metrics"
    with urllib.request.urlopen(url, timeout=5) as response:
        return {f.name for f in text_string_to_metric_families(response.read().decode())}


def held_sync(scenario: Scenario) -> Callable[[Session, Any], None]:
    """A handler (single or batch) that records, raises for poison, and waits at ok-1."""

    def handle(session: Session, messages: Message | Sequence[Message]) -> None:
        for message in messages if isinstance(messages, Sequence) else [messages]:
            if message.value() == b"ok-1":
                scenario.held.set()
                assert scenario.released.wait(WAIT)
            if message.value() == b"poison":
                raise Poison("cannot bill this")
            record(session, message)

    return handle


@pytest.mark.parametrize("loop_class", [ConsumeLoop, BatchConsumeLoop])
def test_the_sync_loops_count_what_they_did_and_report_their_lag(
    loop_class: type[ConsumeLoop] | type[BatchConsumeLoop],
    engine: sa.Engine,
    kafka_bootstrap: str,
    effects: str,  # noqa: F811
) -> None:
    scenario = Scenario(kafka_bootstrap, batch_size=1 if loop_class is ConsumeLoop else 50)
    scenario.produce_first()
    run = Running(loop_class(scenario.settings, held_sync(scenario), sessionmaker(engine)))
    try:
        wait_until(lambda: run.loop.stats.processed == 1, timeout=WAIT)
        wait_until(lambda: lag(scenario.port, scenario.name, scenario.topic) == 0, timeout=WAIT)
        scenario.produce_rest()
        wait_until(lambda: scenario.held.is_set(), timeout=WAIT)
        assert 1 <= (lag(scenario.port, scenario.name, scenario.topic) or 0) <= 5
        scenario.released.set()
        scenario.check(lambda: run.loop.stats.processed)
    finally:
        scenario.released.set()
        run.stop()
    assert run.error is None, repr(run.error)


@pytest.mark.asyncio
@pytest.mark.parametrize("loop_class", [AsyncConsumeLoop, AsyncBatchConsumeLoop])
async def test_the_async_loops_count_what_they_did_and_report_their_lag(
    loop_class: type[AsyncConsumeLoop] | type[AsyncBatchConsumeLoop],
    sessions: async_sessionmaker[AsyncSession],  # noqa: F811
    kafka_bootstrap: str,
    effects: str,  # noqa: F811
) -> None:
    scenario = Scenario(kafka_bootstrap, batch_size=1 if loop_class is AsyncConsumeLoop else 50)
    released, held = asyncio.Event(), asyncio.Event()

    async def handle(session: AsyncSession, messages: Message | Sequence[Message]) -> None:
        for message in messages if isinstance(messages, Sequence) else [messages]:
            if message.value() == b"ok-1":
                held.set()
                await asyncio.wait_for(released.wait(), WAIT)
            if message.value() == b"poison":
                raise Poison("cannot bill this")
            await record_async(session, message)

    await asyncio.to_thread(scenario.produce_first)
    loop = loop_class(scenario.settings, handle, sessions)
    task = asyncio.create_task(loop.run(handle_signals=False))
    try:
        await until(lambda: loop.stats.processed == 1)
        await until_async(lambda: lag(scenario.port, scenario.name, scenario.topic) == 0)
        await asyncio.to_thread(scenario.produce_rest)
        port, name, topic = scenario.port, scenario.name, scenario.topic
        await until_async(lambda: held.is_set())
        assert 1 <= (await asyncio.to_thread(lag, port, name, topic) or 0) <= 5
        released.set()
        await asyncio.to_thread(scenario.check, lambda: loop.stats.processed)
    finally:
        released.set()
        loop.stop()
        await asyncio.wait_for(task, 30)


async def until_async(predicate: Callable[[], bool]) -> None:
    """Wait for a predicate that blocks (a scrape) without blocking the event loop."""
    async with asyncio.timeout(WAIT):
        while not await asyncio.to_thread(predicate):  # noqa: ASYNC110 - a scrape has no event
            await asyncio.sleep(0.1)
