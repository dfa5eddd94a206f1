"""The whole outbox, end to end, on servers of its own: ``make demo``.

An order service writes orders and their ``orders.placed`` events in one transaction each with
``outbox.add``; the relay publishes them to Kafka and is killed with SIGKILL mid-batch (caught
with events of a batch on Kafka and not yet marked published) and restarted; a billing service
(examples/billing.py) turns each event into one invoice with the consume loop and its dedup
table, and is killed once too. At the end: one invoice per order, whatever Kafka delivered twice.

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

    def signal(self, sig: int) -> None:
        assert self.proc is not None
        self.proc.send_signal(sig)

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


# What the relay has marked published: rows leave the outbox when published, and each order was
# committed with its event, so the orders without a row left. One snapshot for both counts.
MARKED = "SELECT (SELECT count(*) FROM orders) - (SELECT count(*) FROM outbox_events)"
# Whether a statement of the relay's claim and marking sessions is still running.
RELAY_BUSY = (
    "SELECT count(*) FROM pg_stat_activity"
    " WHERE application_name LIKE 'outbox-relay work %' AND state = 'active'"
    " AND datname = current_database()"
)


def on_kafka(consumer: Consumer, partitions: list[int]) -> int:
    """Messages on the topic: its partitions' end offsets (before the kill, no duplicates)."""
    ends = (
        consumer.get_watermark_offsets(TopicPartition(TOPIC, p), timeout=10, cached=False)
        for p in partitions
    )
    return sum(end for _, end in ends)


def kill_mid_batch(relay: Service, database_url: str, bootstrap: str) -> tuple[int, int]:
    """SIGKILL the relay while Kafka holds events of its batch that it has not marked published.

    The relay is frozen (SIGSTOP) 1 to 19 ms after it last ran. Once its sessions run no
    statement, nothing of it can commit, so a batch caught now is sure to be sent again after the
    kill. If Kafka then holds more events than the outbox counts as marked, it is killed;
    otherwise it goes on (SIGCONT) and is caught again a little later. Returns (tries, events on
    Kafka not marked); (tries, 0) if no batch was caught so within 60 s (killed anyway).
    """
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": "demo-audit"})
    partitions = sorted(consumer.list_topics(TOPIC, timeout=10).topics[TOPIC].partitions)
    tries, deadline = 0, time.monotonic() + 60
    try:
        with psycopg.connect(database_url, autocommit=True) as conn:
            while time.monotonic() < deadline:
                tries += 1
                time.sleep(0.001 * (1 + tries * 7 % 19))  # 1 to 19 ms, varied
                relay.signal(signal.SIGSTOP)
                if settled(conn):
                    marked = one(conn, MARKED)
                    unmarked = on_kafka(consumer, partitions) - marked
                    if unmarked > 0:
                        relay.kill()
                        return tries, unmarked
                relay.signal(signal.SIGCONT)
    finally:
        consumer.close()
    relay.kill()
    return tries, 0


def settled(conn: psycopg.Connection[tuple[int]], timeout: float = 1.0) -> bool:
    """Whether the (frozen) relay's sessions have finished their statements in time."""
    deadline = time.monotonic() + timeout
    while one(conn, RELAY_BUSY):
        if time.monotonic() > deadline:
            return False
        time.sleep(0.002)
    return True


def one(conn: psycopg.Connection[tuple[int]], sql: str) -> int:
    row = conn.execute(sql).fetchone()
    return int(row[0]) if row else 0


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
            # A relay killed without leaving may still have messages in its producer, so the
            # one restarted claims its shards only once those cannot arrive: this timeout + 5 s.
            "--delivery-timeout",
            "5",
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
        tries, unmarked = kill_mid_batch(relay, database_url, bootstrap)
        if unmarked:
            events = f"{unmarked} event{'s' if unmarked > 1 else ''}"
            step(
                f"relay killed with SIGKILL after {written[0]} orders, mid-batch (caught at try "
                f"{tries}): Kafka holds {events} of its batch not marked published; restarting it"
            )
        else:
            step(
                f"relay killed with SIGKILL after {written[0]} orders, but not mid-batch: no "
                f"batch caught between Kafka's ack and its marking in {tries} tries; restarting it"
            )
        relay.start()
        step("the new relay takes the killed relay's shards once its messages cannot arrive (10 s)")
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
    total_on_kafka, distinct = read_topic(bootstrap, orders)
    return {
        "orders": count(database_url, "SELECT count(*) FROM orders"),
        "published": distinct,
        "unmarked_at_kill": unmarked,
        "kafka_duplicates": total_on_kafka - distinct,
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
  events on Kafka, not marked, when the relay was killed  {result["unmarked_at_kill"]:>7,}
  duplicates Kafka holds (that batch, sent again)        {result["kafka_duplicates"]:>7,}
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
