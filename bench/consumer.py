"""What does the dedup table cost a consumer? The consume loop with dedup against the same loop
without it, on the same messages, in one run.

Both loops run ``relay.consumer.ConsumeLoop`` in batch mode (batches of 500 messages per
transaction, offsets stored after the commit) with a handler that inserts one side-effect row
per message; the only difference is ``deduplicate``. Timed from the first handler call to the
last commit. Runs are interleaved and the median is reported. Embedded servers by default.

    .venv/bin/python bench/consumer.py [--consumer-messages 20000] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import json
import threading
import time
import uuid
from typing import Any

import common
import psycopg
import sqlalchemy as sa
from confluent_kafka import Message, Producer
from sqlalchemy.orm import Session, sessionmaker

from outbox import urls
from relay.consumer import ConsumeLoop, ConsumerSettings

FAST_JOIN = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500", "log_level": "3"}


def produce(bootstrap: str, topic: str, messages: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5, **common.QUIET})
    for i in range(messages):
        body = json.dumps({"order_id": i, "total": "12.50"}).encode().ljust(256)
        while True:
            try:
                producer.produce(topic, body, key=str(i % 1000).encode(),
                                 headers=[("event_id", str(uuid.uuid4()).encode())])  # fmt: skip
                break
            except BufferError:
                producer.poll(0.01)
    producer.flush(60)


def one_run(bootstrap: str, topic: str, engine: sa.Engine, messages: int, batch: int,
            deduplicate: bool) -> float:  # fmt: skip
    """Messages per second through the loop, first handler call to last commit."""
    first: list[float] = []

    def handler(session: Session, message: Message) -> None:
        if not first:
            first.append(time.perf_counter())
        session.execute(sa.text("INSERT INTO side_effects (n) VALUES (:n)"), {"n": len(first)})

    name = f"bench-{uuid.uuid4().hex[:8]}"
    settings = ConsumerSettings(name, [topic], bootstrap, batch_size=batch,
                                kafka_config=FAST_JOIN, deduplicate=deduplicate)  # fmt: skip
    loop = ConsumeLoop(settings, handler, sessionmaker(engine))
    thread = threading.Thread(target=loop.run, kwargs={"handle_signals": False})
    thread.start()
    deadline = time.monotonic() + 300
    while loop.stats.processed < messages and time.monotonic() < deadline:
        time.sleep(0.005)
    end = time.perf_counter()
    loop.stop()
    thread.join()
    if loop.stats.processed < messages:
        raise RuntimeError(f"only {loop.stats.processed} of {messages} processed")
    return messages / (end - first[0])


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    messages, batch = opts.consumer_messages, opts.consumer_batch
    rates: dict[bool, list[float]] = {True: [], False: []}
    with env.database() as url, env.topic() as topic:
        with psycopg.connect(url) as conn:
            conn.execute("CREATE TABLE side_effects (id bigserial PRIMARY KEY, n int)")
        produce(env.bootstrap, topic, messages)
        engine = sa.create_engine(urls.to_sqlalchemy(url))
        try:
            for run in range(opts.runs):  # interleaved, so drift hits both alike
                for deduplicate in (True, False):
                    rates[deduplicate].append(
                        one_run(env.bootstrap, topic, engine, messages, batch, deduplicate)
                    )
                common.progress(
                    f"consumer run {run + 1}/{opts.runs}: with dedup {rates[True][-1]:,.0f}/s, "
                    f"without {rates[False][-1]:,.0f}/s"
                )
        finally:
            engine.dispose()
    with_dedup, without = common.median(rates[True]), common.median(rates[False])
    return {
        "messages": messages,
        "batch_size": batch,
        "with_dedup_msgs_per_s": with_dedup,
        "without_dedup_msgs_per_s": without,
        "ratio": common.ratio(with_dedup, without),
        "runs": {"with_dedup": rates[True], "without_dedup": rates[False]},
    }


def rows(result: dict[str, Any]) -> list[common.Row]:
    batch = result["batch_size"]
    return [
        common.Row("consumer", f"consume loop without dedup, batches of {batch}",
                   common.num(result["without_dedup_msgs_per_s"]), "msg/s", "baseline"),
        common.Row("consumer", f"consume loop with dedup, batches of {batch}",
                   common.num(result["with_dedup_msgs_per_s"]), "msg/s",
                   f"{result['ratio']:.2f} of without"),
    ]  # fmt: skip


def targets(result: dict[str, Any]) -> list[common.Target]:
    return [
        common.Target("consumer with dedup", result["with_dedup_msgs_per_s"], ">=", 20_000,
                      "msg/s"),
        common.Target("consumer with dedup / without", result["ratio"], ">=", 0.6),
    ]  # fmt: skip


if __name__ == "__main__":
    common.standalone(__doc__, "consumer", measure, rows, targets)
