"""The whole outbox, end to end, on servers of its own: ``make demo``.

An order service writes orders and their ``orders.placed`` events in one transaction each with
``outbox.add``; the relay publishes them to Kafka and is killed with SIGKILL half-way and
restarted; a billing service (examples/billing.py) turns each event into one invoice with the
consume loop and its dedup table, and is killed once too. At the end: one invoice per order,
whatever Kafka delivered twice.

Runs on an embedded PostgreSQL and an embedded Kafka-protocol broker (Tansu), or on the servers
named by OUTBOX_TEST_DATABASE_URL and OUTBOX_TEST_KAFKA_BOOTSTRAP. Stops everything it started.
"""

from __future__ import annotations

import argparse
import json
import signal
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Callable
from decimal import Decimal
from pathlib import Path

import psycopg
import sqlalchemy as sa
from confluent_kafka import Consumer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic
from sqlalchemy.orm import Session

from examples.quickstart import Base, place_order
from outbox import testing, urls

TOPIC = "orders.placed"
HERE = Path(__file__).resolve().parent


class Service:
    """A child process with its log in a file; can be killed and started again."""

    def __init__(self, name: str, command: list[str], logs: Path) -> None:
        self.name, self.command, self.log_path = name, command, logs / f"{name}.log"
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(self.command, stdout=log, stderr=subprocess.STDOUT)

    def kill(self) -> None:
        assert self.proc is not None
        self.proc.send_signal(signal.SIGKILL)
        self.proc.wait()

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(30)
            except subprocess.TimeoutExpired:
                self.proc.kill()

    def log_lines(self, event: str) -> int:
        return sum(1 for line in self.log_path.read_text().splitlines() if f'"{event}"' in line)


def step(text: str) -> None:
    print(f"  {time.strftime('%H:%M:%S')}  {text}", flush=True)


def wait_until(predicate: Callable[[], bool], timeout: float, what: str) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        if time.monotonic() > deadline:
            raise SystemExit(f"demo failed: {what} not reached within {timeout:.0f} s")
        time.sleep(0.2)


def count(database_url: str, sql: str) -> int:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


def read_topic(bootstrap: str, expected_ids: int) -> tuple[int, int]:
    """(messages on the topic, distinct event ids among them)."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-audit"})
    partitions = consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions
    consumer.assign([TopicPartition(TOPIC, p, 0) for p in partitions])
    total, ids, quiet_since = 0, set(), time.monotonic()
    while len(ids) < expected_ids or time.monotonic() - quiet_since < 2:
        batch = [m for m in consumer.consume(1000, 0.5) if m.error() is None]
        if batch:
            quiet_since = time.monotonic()
        for msg in batch:
            total += 1
            ids.add(dict(msg.headers() or [])["event_id"])
        if time.monotonic() - quiet_since > 30:
            break
    consumer.close()
    return total, len(ids)


def write_orders(database_url: str, orders: int, written: list[int]) -> None:
    """The order service: one order and its event per transaction, about 500 a second."""
    engine = sa.create_engine(urls.to_sqlalchemy(database_url))
    for i in range(orders):
        with Session(engine) as session, session.begin():
            place_order(session, f"customer-{i % 50}", Decimal(10 + i % 90))
        written[0] = i + 1
        time.sleep(0.002)
    engine.dispose()


def run(database_url: str, bootstrap: str, orders: int, logs: Path) -> dict[str, int]:
    subprocess.run(
        [sys.executable, "-m", "outbox_relay", "schema", "apply", "--database-url", database_url],
        check=True,
        capture_output=True,
    )
    step("schema applied (outbox-relay schema apply)")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(TOPIC, num_partitions=3, replication_factor=1)])[TOPIC].result(30)
    Base.metadata.create_all(sa.create_engine(urls.to_sqlalchemy(database_url)))
    servers = ["--database-url", database_url, "--kafka-bootstrap-servers", bootstrap]
    relay = Service(
        "relay",
        [
            sys.executable,
            "-m",
            "outbox_relay",
            "--log-format",
            "json",
            "run",
            "--batch-size",
            "100",
            *servers,
        ],
        logs,
    )
    billing = Service("billing", [sys.executable, str(HERE / "billing.py"), *servers], logs)
    relay.start()
    billing.start()
    step("relay and billing consumer started")
    written = [0]
    writer = threading.Thread(target=write_orders, args=(database_url, orders, written))
    writer.start()
    try:
        wait_until(lambda: written[0] >= orders // 3, 120, "a third of the orders")
        relay.kill()
        step(f"relay killed with SIGKILL after {written[0]} orders; restarting it")
        relay.start()
        invoices = "SELECT count(*) FROM invoices"
        wait_until(lambda: count(database_url, invoices) >= orders // 2, 120, "half the invoices")
        billing.kill()
        step(
            f"billing killed with SIGKILL after {count(database_url, invoices)} invoices; "
            "restarting it"
        )
        billing.start()
        writer.join()
        step(f"all {orders} orders written; waiting for the last invoices")
        wait_until(lambda: count(database_url, invoices) >= orders, 180, "one invoice per order")
        time.sleep(2)  # let any late redelivery arrive and be skipped
    finally:
        writer.join()
        relay.stop()
        billing.stop()
    on_kafka, distinct = read_topic(bootstrap, orders)
    return {
        "orders": count(database_url, "SELECT count(*) FROM orders"),
        "published": distinct,
        "kafka_duplicates": on_kafka - distinct,
        "skipped": billing.log_lines("consumer.duplicate_skipped"),
        "invoices": count(database_url, invoices),
        "outbox_left": count(database_url, "SELECT count(*) FROM outbox_events"),
    }


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--orders", type=int, default=3000)
    args = parser.parse_args()
    print("outbox-relay demo: order service -> outbox -> relay -> Kafka -> billing\n")
    with tempfile.TemporaryDirectory(prefix="outbox-demo-") as tmp:
        logs = Path(tmp)
        with testing.postgres() as server, testing.kafka(logs / "broker.log") as bootstrap:
            step("embedded PostgreSQL and Kafka-protocol broker started")
            name = testing.unique_name("outbox_demo")
            database_url = testing.create_database(server, name)
            try:
                result = run(database_url, bootstrap, args.orders, logs)
            finally:
                testing.drop_database(server, name)
    print(f"""
  orders written (each with its event, one transaction)  {result["orders"]:>7,}
  events published to Kafka (distinct event ids)         {result["published"]:>7,}
  duplicates Kafka holds (relay killed mid-batch)        {result["kafka_duplicates"]:>7,}
  duplicates skipped by the dedup table                  {result["skipped"]:>7,}
     (Kafka duplicates + redeliveries after the billing crash)
  invoices written (side effects)                        {result["invoices"]:>7,}
  outbox rows left unpublished                           {result["outbox_left"]:>7,}
""")
    ok = result["invoices"] == result["orders"] == result["published"]
    print("  one invoice per order: " + ("yes" if ok else "NO"))
    print(json.dumps(result))
    if not ok:
        raise SystemExit(1)


if __name__ == "__main__":
    main()
