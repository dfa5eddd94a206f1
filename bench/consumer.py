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
  on an ``AsyncSession``, against the sync batch loop with dedup;
- what the consumer metrics cost: the batch loop with dedup recording into a Prometheus registry
  against the same loop without metrics, and the same pair with one message per transaction
  (where the metrics are paid per message) on the first 3,000 messages.

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
from prometheus_client import CollectorRegistry
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

#: (handler kind, deduplicate, metrics, one message per transaction) of each loop measured, in
#: the order run.
Loop = tuple[str, bool, bool, bool]
LOOPS: list[Loop] = [
    ("batch", True, False, False),
    ("batch", False, False, False),
    ("message", True, False, False),
    ("message", False, False, False),
    ("async batch", True, False, False),
]
#: The metrics' cost: each pair (off, on) runs off, on, on, off in every run, so that what drifts
#: along a run (the dedup table grows with every loop) weighs on both alike.
METRICS_PAIRS: list[tuple[Loop, Loop]] = [
    (("batch", True, False, False), ("batch", True, True, False)),
    (("batch", True, False, True), ("batch", True, True, True)),
]
#: Messages of the runs with one message per transaction (about 1,000 transactions a second).
SINGLE_MESSAGES = 3000


def describe(loop: Loop) -> str:
    kind, dedup, metrics, single = loop
    return (
        f"{kind} handler {'with' if dedup else 'without'} dedup"
        + (" and metrics" if metrics else "")
        + (", one per transaction" if single else "")
    )


def one_run(
    bootstrap: str,
    topic: str,
    engine: sa.Engine,
    messages: int,
    batch: int,
    loop_kind: Loop,
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

    kind, deduplicate, metrics, single = loop_kind
    if single:
        batch, messages = 1, min(messages, SINGLE_MESSAGES)
    name = f"bench-{uuid.uuid4().hex[:8]}"
    settings = ConsumerSettings(
        name, [topic], bootstrap, batch_size=batch, kafka_config=FAST_JOIN, deduplicate=deduplicate
    )
    if kind == "async batch":
        return async_run(settings, engine, messages)
    registry = CollectorRegistry() if metrics else None
    loop: ConsumeLoop | BatchConsumeLoop = (
        BatchConsumeLoop(settings, per_batch, sessionmaker(engine), registry=registry)
        if kind == "batch"
        else ConsumeLoop(settings, per_message, sessionmaker(engine), registry=registry)
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
    rates: dict[Loop, list[float]] = {loop: [] for loop in LOOPS}
    paired: dict[Loop, list[float]] = {loop: [] for pair in METRICS_PAIRS for loop in pair}
    with env.database() as url, env.topic() as topic:
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE side_effects (id bigserial PRIMARY KEY, n bigint)")
        produce(env.bootstrap, topic, messages)
        engine = sa.create_engine(urls.to_sqlalchemy(url))
        try:
            for run in range(opts.runs):  # interleaved, so drift hits all alike
                for loop in LOOPS:
                    rates[loop].append(one_run(env.bootstrap, topic, engine, messages, batch, loop))
                for off, on in METRICS_PAIRS:
                    for loop in (off, on, on, off):
                        paired[loop].append(
                            one_run(env.bootstrap, topic, engine, messages, batch, loop)
                        )
                common.progress(
                    f"consumer run {run + 1}/{opts.runs}: "
                    + ", ".join(f"{describe(loop)} {rates[loop][-1]:,.0f}/s" for loop in LOOPS)
                    + "; metrics pairs: "
                    + ", ".join(f"{describe(loop)} {paired[loop][-1]:,.0f}/s" for loop in paired)
                )
        finally:
            engine.dispose()
    result: dict[str, Any] = {"messages": messages, "batch_size": batch, "runs": {}}
    for kind in ("batch", "message"):
        with_dedup = common.median(rates[kind, True, False, False])
        without = common.median(rates[kind, False, False, False])
        result[kind] = {
            "with_dedup_msgs_per_s": with_dedup,
            "without_dedup_msgs_per_s": without,
            "ratio": common.ratio(with_dedup, without),
        }
        result["runs"][kind] = {
            "with_dedup": rates[kind, True, False, False],
            "without_dedup": rates[kind, False, False, False],
        }
    async_rate = common.median(rates["async batch", True, False, False])
    result["async_batch"] = {
        "with_dedup_msgs_per_s": async_rate,
        "ratio_to_sync": common.ratio(async_rate, result["batch"]["with_dedup_msgs_per_s"]),
    }
    result["runs"]["async_batch"] = {"with_dedup": rates["async batch", True, False, False]}
    result["metrics"] = {}
    for off_loop, on_loop in METRICS_PAIRS:
        on, off = common.median(paired[on_loop]), common.median(paired[off_loop])
        key = "one_per_transaction" if on_loop[3] else "batches"
        result["metrics"][key] = {
            "on_msgs_per_s": on,
            "off_msgs_per_s": off,
            "ratio": common.ratio(on, off),
        }
        result["runs"][f"metrics_{key}"] = {"on": paired[on_loop], "off": paired[off_loop]}
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
    for key, label in (
        ("batches", f"batches of {batch}"),
        ("one_per_transaction", "one message per transaction"),
    ):
        figures = result.get("metrics", {}).get(key)
        if figures:
            off = common.num(figures["off_msgs_per_s"])
            out.append(
                common.Row(
                    "consumer",
                    f"batch handler with dedup and metrics, {label}",
                    common.num(figures["on_msgs_per_s"]),
                    "msg/s",
                    f"{figures['ratio']:.2f} of metrics off ({off})",
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
