"""What does the dedup table cost a consumer? The consume loop with dedup against the same loop
without it, on the same messages, in one run.

Both loops run ``relay.consumer.ConsumeLoop`` in batch mode (``--batch-size`` messages per
transaction, offsets stored after the commit) with a handler that inserts one side-effect row
per message; the only difference is ``deduplicate``. Timed from the first handler call to the
last commit. Runs are interleaved and the median is reported. Embedded servers by default.

    .venv/bin/python bench/consumer.py [--messages 20000] [--batch-size 500] [--runs 3]
"""

from __future__ import annotations

import argparse
import json
import statistics
import threading
import time
import uuid

import psycopg
import sqlalchemy as sa
from confluent_kafka import Message, Producer
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy.orm import Session, sessionmaker

from outbox import testing, urls
from outbox.settings import OutboxSettings
from relay.consumer import ConsumeLoop, ConsumerSettings
from schema import migrator

FAST_JOIN = {"session.timeout.ms": "6000", "heartbeat.interval.ms": "500"}


def produce(bootstrap: str, topic: str, messages: int) -> None:
    producer = Producer({"bootstrap.servers": bootstrap, "linger.ms": 5})
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


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--messages", type=int, default=20_000)
    parser.add_argument("--batch-size", type=int, default=500)
    parser.add_argument("--runs", type=int, default=3)
    args = parser.parse_args()
    with testing.postgres() as server, testing.kafka() as bootstrap:
        name = testing.unique_name("bench_consumer")
        database_url = testing.create_database(server, name)
        try:
            with psycopg.connect(database_url) as conn:
                migrator.apply(conn, OutboxSettings())
                conn.execute("CREATE TABLE side_effects (id bigserial PRIMARY KEY, n int)")
            topic = testing.unique_name("bench").replace("_", "-")
            admin = AdminClient({"bootstrap.servers": bootstrap})
            admin.create_topics([NewTopic(topic, 3, 1)])[topic].result(30)
            produce(bootstrap, topic, args.messages)
            engine = sa.create_engine(urls.to_sqlalchemy(database_url))
            rates: dict[bool, list[float]] = {True: [], False: []}
            for _ in range(args.runs):
                for deduplicate in (True, False):
                    rates[deduplicate].append(one_run(bootstrap, topic, engine, args.messages,
                                                      args.batch_size, deduplicate))  # fmt: skip
            engine.dispose()
        finally:
            testing.drop_database(server, name)
    with_dedup, without = statistics.median(rates[True]), statistics.median(rates[False])
    print(f"\n{args.messages:,} messages, batches of {args.batch_size}, median of {args.runs} runs")
    print(f"{'':40} {'messages/s':>11} {'ratio':>7}")
    print(f"{'consume loop without dedup (baseline)':40} {without:11,.0f} {1:7.2f}")
    print(f"{'consume loop with dedup':40} {with_dedup:11,.0f} {with_dedup / without:7.2f}")


if __name__ == "__main__":
    main()
