"""What does the dedup table cost a consumer? The consume loop with dedup against the same loop
without it, on the same messages, in one run.

Every loop runs in batch mode (batches of 500 messages per transaction, offsets stored after the
commit) and writes one side-effect row per message; with and without ``deduplicate``, and with
two kinds of handler:

- ``outbox.consumer.BatchConsumeLoop``, whose handler gets the batch's new messages at once and
  inserts their rows in one statement (the targets are on these figures);
- ``outbox.consumer.ConsumeLoop``, whose handler is called per message and inserts its row with
  its own statement (one round trip per message, which is what limits it);
- ``outbox.consumer_async.AsyncBatchConsumeLoop`` with dedup, the batch handler's coroutine twin
  on an ``AsyncSession``, against the sync batch loop with dedup.

Timed from the first handler call to the last commit. Runs are interleaved and the median is
reported. Embedded servers by default.

    .venv/bin/python bench/consumer.py [--consumer-messages 20000] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import asyncio
import json
import threading
import time
import uuid
from collections.abc import Sequence
from typing import Any

import common
import psycopg
import sqlalchemy as sa
from confluent_kafka import Message, Producer
from sqlalchemy.orm import Session, sessionmaker

from outbox import urls
from outbox.consumer import BatchConsumeLoop, ConsumeLoop, ConsumerSettings
from outbox.consumer_async import AsyncBatchConsumeLoop

FAST_JOIN = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500", "log_level": "3"}


def produce(bootstrap: str, topic: str, messages: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **common.QUIET})
    for i in range(messages):
        body = json.dumps({"order_id": i, "total": "12.50"}).encode().ljust(256)
        while True:
            try:
                producer.produce(
                    topic,
                    body,
                    key=str(i % 1000).encode(),
                    headers=[("event_id", str(uuid.uuid4()).encode())],
                )
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)


SIDE_EFFECTS = sa.table("side_effects", sa.column("n", sa.Integer))

#: (handler kind, deduplicate) of each loop measured, in the order run.
LOOPS = [
    ("batch", True),
    ("batch", False),
    ("message", True),
    ("message", False),
    ("async batch", True),
]


def one_run(
    bootstrap: str,
    topic: str,
    engine: sa.Engine,
    messages: int,
    batch: int,
    kind: str,
    deduplicate: bool,
) -> float:
    """Messages per second through the loop, first handler call to last commit."""
    first: list[float] = []

    def per_message(session: Session, message: Message) -> None:
        if not first:
            first.append(time.perf_counter())
        session.execute(sa.insert(SIDE_EFFECTS), {"n": message.offset()})

    def per_batch(session: Session, batch: Sequence[Message]) -> None:
        if not first:
            first.append(time.perf_counter())
        session.execute(sa.insert(SIDE_EFFECTS), [{"n": message.offset()} for message in batch])

    name = f"bench-{uuid.uuid4().hex[:8]}"
    settings = ConsumerSettings(
        name, [topic], bootstrap, batch_size=batch, kafka_config=FAST_JOIN, deduplicate=deduplicate
    )
    if kind == "async batch":
        return async_run(settings, engine, messages)
    loop: ConsumeLoop | BatchConsumeLoop = (
        BatchConsumeLoop(settings, per_batch, sessionmaker(engine))
        if kind == "batch"
        else ConsumeLoop(settings, per_message, sessionmaker(engine))
    )
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False})
    thread.start()
    return timed_until_done(loop, thread, messages, first)


def timed_until_done(
    loop: ConsumeLoop | BatchConsumeLoop | AsyncBatchConsumeLoop,
    thread: threading.Thread,
    messages: int,
    first: list[float],
) -> float:
    """Messages per second from the first handler call until all are processed; then stop."""
    deadline = time.monotonic() + 300
    while loop.stats.processed < messages and time.monotonic() < deadline:
        time.sleep(0.002)
    end = time.perf_counter()
    loop.stop()
    thread.join()
    if loop.stats.processed < messages:
        raise RuntimeError(f"only {loop.stats.processed} of {messages} processed")
    return messages / (end - first[0])


def async_run(settings: ConsumerSettings, engine: sa.Engine, messages: int) -> float:
    """The async batch loop on an event loop of its own thread; timed as the others."""
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    first: list[float] = []
    started = threading.Event()
    loops: list[AsyncBatchConsumeLoop] = []

    async def per_batch(session: AsyncSession, batch: Sequence[Message]) -> None:
        if not first:
            first.append(time.perf_counter())
        await session.execute(
            sa.insert(SIDE_EFFECTS), [{"n": message.offset()} for message in batch]
        )

    async def main() -> None:
        async_engine = create_async_engine(engine.url)
        loop = AsyncBatchConsumeLoop(settings, per_batch, async_sessionmaker(async_engine))
        loops.append(loop)
        started.set()
        try:
            await loop.run(handle_signals=False)
        finally:
            await async_engine.dispose()

    thread = threading.Thread(target=asyncio.run, args=(main(),))
    thread.start()
    started.wait(60)
    loop = loops[0]
    return timed_until_done(loop, thread, messages, first)


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    messages, batch = opts.consumer_messages, opts.consumer_batch
    rates: dict[tuple[str, bool], list[float]] = {loop: [] for loop in LOOPS}
    with env.database() as url, env.topic() as topic:
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE side_effects (id bigserial PRIMARY KEY, n bigint)")
        produce(env.bootstrap, topic, messages)
        engine = sa.create_engine(urls.to_sqlalchemy(url))
        try:
            for run in range(opts.runs):  # interleaved, so drift hits all alike
                for kind, deduplicate in LOOPS:
                    rates[kind, deduplicate].append(
                        one_run(env.bootstrap, topic, engine, messages, batch, kind, deduplicate)
                    )
                common.progress(
                    f"consumer run {run + 1}/{opts.runs}: "
                    + ", ".join(
                        f"{kind} handler {'with' if dedup else 'without'} dedup "
                        f"{rates[kind, dedup][-1]:,.0f}/s"
                        for kind, dedup in LOOPS
                    )
                )
        finally:
            engine.dispose()
    result: dict[str, Any] = {"messages": messages, "batch_size": batch, "runs": {}}
    for kind in ("batch", "message"):
        with_dedup = common.median(rates[kind, True])
        without = common.median(rates[kind, False])
        result[kind] = {
            "with_dedup_msgs_per_s": with_dedup,
            "without_dedup_msgs_per_s": without,
            "ratio": common.ratio(with_dedup, without),
        }
        result["runs"][kind] = {
            "with_dedup": rates[kind, True],
            "without_dedup": rates[kind, False],
        }
    async_rate = common.median(rates["async batch", True])
    result["async_batch"] = {
        "with_dedup_msgs_per_s": async_rate,
        "ratio_to_sync": common.ratio(async_rate, result["batch"]["with_dedup_msgs_per_s"]),
    }
    result["runs"]["async_batch"] = {"with_dedup": rates["async batch", True]}
    return result


HANDLERS = {"batch": "batch handler", "message": "per-message handler"}


def rows(result: dict[str, Any]) -> list[common.Row]:
    batch = result["batch_size"]
    out: list[common.Row] = []
    for kind, label in HANDLERS.items():
        figures = result[kind]
        out += [
            common.Row(
                "consumer",
                f"{label} without dedup, batches of {batch}",
                common.num(figures["without_dedup_msgs_per_s"]),
                "msg/s",
                "baseline",
            ),
            common.Row(
                "consumer",
                f"{label} with dedup, batches of {batch}",
                common.num(figures["with_dedup_msgs_per_s"]),
                "msg/s",
                f"{figures['ratio']:.2f} of without",
            ),
        ]
    figures = result["async_batch"]
    out.append(
        common.Row(
            "consumer",
            f"async batch handler with dedup, batches of {batch}",
            common.num(figures["with_dedup_msgs_per_s"]),
            "msg/s",
            f"{figures['ratio_to_sync']:.2f} of the sync batch loop with dedup",
        )
    )
    return out


def targets(result: dict[str, Any]) -> list[common.Target]:
    figures = result["batch"]
    return [
        common.Target(
            "consumer with dedup (batch handler)",
            figures["with_dedup_msgs_per_s"],
            ">=",
            20_000,
            "msg/s",
        ),
        common.Target("consumer with dedup / without (batch handler)", figures["ratio"], ">=", 0.6),
    ]


if __name__ == "__main__":
    common.standalone(__doc__, "consumer", measure, rows, targets)
