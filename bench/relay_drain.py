"""How fast does one relay drain a backlog, next to the raw producer on the same messages?

Measured in one run, on the embedded servers (or OUTBOX_TEST_DATABASE_URL /
OUTBOX_TEST_KAFKA_BOOTSTRAP when set):

* raw producer: confluent-kafka with the relay's own producer settings sending the same
  messages (same topic layout, keys, payloads and headers, event_id included), produce + flush;
* drain: ``outbox-relay run --exit-when-idle`` on a backlog of the same events: the process's
  wall time minus that of the same command on an empty outbox (start-up and shut-down), so both
  sides time the same work: from the first message handed to the producer to the last flushed;
* latency: commit-to-delivery at a steady rate, with NOTIFY wake-ups (p50, p99);
* memory: the relay process's peak RSS during the drain.

Every figure is the median of ``--runs`` runs.

    .venv/bin/python bench/relay_drain.py [--events 100000] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import argparse
import contextlib
import json
import os
import statistics
import subprocess
import sys
import threading
import time
import uuid
from typing import Any

import psycopg
from confluent_kafka import Consumer, Producer, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

import outbox
from outbox import testing
from outbox.settings import OutboxSettings
from relay.config import RelaySettings
from relay.kafka import producer_config
from schema import migrator

PARTITIONS = 3
KEYS = 1000


def payload(i: int, size: int) -> bytes:
    body = json.dumps({"order_id": i, "status": "placed"}).encode()
    return body + b" " * max(0, size - len(body))


def new_topic(bootstrap: str) -> str:
    name = testing.unique_name("bench").replace("_", "-")
    admin = AdminClient({"bootstrap.servers": bootstrap})
    admin.create_topics([NewTopic(name, PARTITIONS, 1)])[name].result(30)
    return name


def broker_span(bootstrap: str, topic: str, expected: int, timeout: float = 120) -> float:
    """Reads all ``expected`` messages of ``topic``; seconds between their first and last
    producer timestamps."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic})
    consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
    first, last, count = float("inf"), 0.0, 0
    deadline = time.monotonic() + timeout
    while count < expected and time.monotonic() < deadline:
        for msg in consumer.consume(10_000, 0.5):
            if msg.error() is None:
                ts = msg.timestamp()[1] / 1000
                first, last, count = min(first, ts), max(last, ts), count + 1
    consumer.close()
    if count < expected:
        raise RuntimeError(f"only {count} of {expected} messages arrived on {topic}")
    return last - first


def raw_producer(bootstrap: str, events: int, size: int) -> float:
    """Events/s of the relay's producer settings sending the same messages; produce to flush."""
    topic = new_topic(bootstrap)
    settings = RelaySettings(database_url="postgresql://unused", kafka_bootstrap_servers=bootstrap)
    producer = Producer(producer_config(settings))
    messages = [
        (f"key-{i % KEYS}".encode(), payload(i, size), [("event_id", str(uuid.uuid4()).encode())])
        for i in range(events)
    ]
    producer.list_topics(timeout=30)  # connected, like the relay once it has started
    start = time.perf_counter()
    for key, value, headers in messages:
        while True:
            try:
                producer.produce(topic, value=value, key=key, headers=headers)
                break
            except BufferError:
                producer.poll(0.01)
        producer.poll(0)
    producer.flush(120)
    return events / (time.perf_counter() - start)


def fill_outbox(database_url: str, topic: str, events: int, size: int) -> None:
    with psycopg.connect(database_url) as conn:
        for start in range(0, events, 5000):
            outbox.add_many(
                conn,
                [
                    outbox.Event(topic, payload(i, size), key=f"key-{i % KEYS}")
                    for i in range(start, min(events, start + 5000))
                ],
            )
            conn.commit()
        conn.autocommit = True
        conn.execute("VACUUM ANALYZE outbox_events")


def relay_cmd(database_url: str, bootstrap: str, *extra: str) -> list[str]:
    return [
        sys.executable, "-m", "relay", "--log-format", "json", "--log-level", "warning", "run",
        "--database-url", database_url, "--kafka-bootstrap-servers", bootstrap, *extra,
    ]  # fmt: skip


def run_measuring_rss(command: list[str]) -> float:
    """Run ``command`` to completion; its own peak resident memory in MB (sampled every 10 ms
    from /proc, so other children of this process don't count)."""
    proc = subprocess.Popen(command)
    peak_kb = 0
    while proc.poll() is None:
        with contextlib.suppress(OSError), open(f"/proc/{proc.pid}/status") as status:
            for line in status:
                if line.startswith("VmRSS:"):
                    peak_kb = max(peak_kb, int(line.split()[1]))
        time.sleep(0.01)
    if proc.returncode != 0:
        raise subprocess.CalledProcessError(proc.returncode, command)
    return peak_kb / 1024


def drain(server: str, bootstrap: str, events: int, size: int) -> dict[str, float]:
    name = testing.unique_name("bench_drain")
    database_url = testing.create_database(server, name)
    try:
        with psycopg.connect(database_url) as conn:
            migrator.apply(conn, OutboxSettings())
        topic = new_topic(bootstrap)
        fill_outbox(database_url, topic, events, size)
        command = relay_cmd(database_url, bootstrap, "--exit-when-idle")
        start = time.perf_counter()
        peak_rss_mb = run_measuring_rss(command)
        wall = time.perf_counter() - start
        broker_span(bootstrap, topic, events)  # every event arrived
        start = time.perf_counter()
        subprocess.run(command, check=True)  # the same command with nothing left: fixed costs
        overhead = time.perf_counter() - start
        return {"events_per_s": events / (wall - overhead), "wall_events_per_s": events / wall,
                "overhead_s": overhead, "peak_rss_mb": peak_rss_mb}  # fmt: skip
    finally:
        testing.drop_database(server, name)


def latency(server: str, bootstrap: str, rate: float, seconds: float) -> dict[str, float]:
    """Commit-to-delivery latency at a steady ``rate`` of single-event transactions."""
    name = testing.unique_name("bench_latency")
    database_url = testing.create_database(server, name)
    relay = None
    try:
        with psycopg.connect(database_url) as conn:
            migrator.apply(conn, OutboxSettings())
        topic = new_topic(bootstrap)
        relay = subprocess.Popen(relay_cmd(database_url, bootstrap, "--poll-interval", "5"))
        time.sleep(2)  # let it start and own its shards
        committed: dict[str, float] = {}
        received: dict[str, float] = {}
        done = threading.Event()

        def consume() -> None:
            consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": topic,
                                 "fetch.wait.max.ms": 1})  # fmt: skip
            consumer.assign([TopicPartition(topic, p, 0) for p in range(PARTITIONS)])
            while not done.is_set() or len(received) < len(committed):
                msg = consumer.poll(0.05)
                if msg is not None and msg.error() is None:
                    event_id = dict(msg.headers() or [])["event_id"].decode()
                    received[event_id] = time.time()
                if done.is_set() and time.monotonic() > stop_waiting:
                    break
            consumer.close()

        stop_waiting = float("inf")
        reader = threading.Thread(target=consume)
        reader.start()
        with psycopg.connect(database_url) as conn:
            interval, next_at, end = 1 / rate, time.monotonic(), time.monotonic() + seconds
            i = 0
            while time.monotonic() < end:
                event_id = outbox.add(conn, topic, payload(i, 256), key=f"key-{i % KEYS}")
                conn.commit()
                committed[str(event_id)] = time.time()
                i += 1
                next_at += interval
                time.sleep(max(0.0, next_at - time.monotonic()))
        stop_waiting = time.monotonic() + 15
        done.set()
        reader.join()
        samples = sorted(1000 * (received[k] - t) for k, t in committed.items() if k in received)
        q = statistics.quantiles(samples, n=100)
        return {"p50_ms": q[49], "p99_ms": q[98], "samples": len(samples),
                "missing": len(committed) - len(samples)}  # fmt: skip
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(30)
        testing.drop_database(server, name)


def soak(server: str, bootstrap: str, rate: float, seconds: float) -> dict[str, Any]:
    """Writers at ``rate`` events/s and one relay for ``seconds``: the outbox table's total size
    (with indexes and TOAST) sampled every 10 s, and the backlog at the end."""
    name = testing.unique_name("bench_soak")
    database_url = testing.create_database(server, name)
    relay = None
    try:
        with psycopg.connect(database_url) as conn:
            migrator.apply(conn, OutboxSettings())
        topic = new_topic(bootstrap)
        relay = subprocess.Popen(relay_cmd(database_url, bootstrap))
        per_commit = max(1, round(rate / 200))  # 200 transactions a second
        sizes: list[tuple[float, int]] = []
        with psycopg.connect(database_url) as conn, psycopg.connect(database_url) as probe:
            probe.autocommit = True
            start = next_at = next_sample = time.monotonic()
            i = 0
            while (now := time.monotonic()) < start + seconds:
                events = [outbox.Event(topic, payload(i + j, 256), key=f"key-{(i + j) % KEYS}")
                          for j in range(per_commit)]  # fmt: skip
                outbox.add_many(conn, events)
                conn.commit()
                i += per_commit
                if now >= next_sample:
                    size = probe.execute(
                        "SELECT pg_total_relation_size('outbox_events')"
                    ).fetchone()
                    sizes.append((round(now - start), int(size[0]) if size else 0))
                    next_sample += 10
                next_at += per_commit / rate
                time.sleep(max(0.0, next_at - time.monotonic()))
            time.sleep(5)
            backlog = probe.execute("SELECT count(*) FROM outbox_events").fetchone()
        return {"written": i, "rate": i / seconds, "sizes_bytes": sizes,
                "backlog_at_end": int(backlog[0]) if backlog else -1}  # fmt: skip
    finally:
        if relay is not None:
            relay.terminate()
            relay.wait(30)
        testing.drop_database(server, name)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--events", type=int, default=100_000)
    parser.add_argument("--size", type=int, default=256)
    parser.add_argument("--runs", type=int, default=3)
    parser.add_argument("--rate", type=float, default=200)
    parser.add_argument("--latency-seconds", type=float, default=15)
    parser.add_argument("--soak-seconds", type=float, default=0, help="0 skips the soak")
    parser.add_argument("--soak-rate", type=float, default=2000)
    parser.add_argument("--json", dest="json_path")
    args = parser.parse_args()

    results: dict[str, Any] = {"events": args.events, "size": args.size, "runs": args.runs}
    with testing.postgres() as server, testing.kafka() as bootstrap:
        raw, relay, wall, rss = [], [], [], []
        for _ in range(args.runs):  # interleaved, so drift hits both alike
            raw.append(raw_producer(bootstrap, args.events, args.size))
            run = drain(server, bootstrap, args.events, args.size)
            relay.append(run["events_per_s"])
            wall.append(run["wall_events_per_s"])
            rss.append(run["peak_rss_mb"])
        results |= {
            "raw_producer_events_per_s": statistics.median(raw),
            "relay_events_per_s": statistics.median(relay),
            "relay_wall_events_per_s": statistics.median(wall),
            "relay_peak_rss_mb": max(rss),
            "latency": latency(server, bootstrap, args.rate, args.latency_seconds),
        }
        if args.soak_seconds:
            results["soak"] = soak(server, bootstrap, args.soak_rate, args.soak_seconds)
    report(results)
    if args.json_path:
        with open(args.json_path, "w") as f:
            json.dump(results, f, indent=2)


def report(r: dict[str, Any]) -> None:
    raw, relay = r["raw_producer_events_per_s"], r["relay_events_per_s"]
    lat = r["latency"]
    print(f"\n{r['events']:,} events of {r['size']} bytes, {KEYS} keys, median of {r['runs']} runs")
    print(f"{'':44} {'events/s':>10} {'ratio':>7}")
    print(f"{'raw producer, same messages (baseline)':44} {raw:10,.0f} {1:7.2f}")
    print(f"{'relay drain (wall minus start-up/shut-down)':44} {relay:10,.0f} {relay / raw:7.2f}")
    print(f"{'relay drain, whole process wall time':44} {r['relay_wall_events_per_s']:10,.0f} "
          f"{r['relay_wall_events_per_s'] / raw:7.2f}")  # fmt: skip
    print(f"\nrelay peak RSS during drain: {r['relay_peak_rss_mb']:.0f} MB")
    print(f"commit-to-delivery latency: p50 {lat['p50_ms']:.1f} ms, p99 {lat['p99_ms']:.1f} ms "
          f"({lat['samples']} events, {lat['missing']} missing)")  # fmt: skip
    if "soak" in r:
        soak = r["soak"]
        sizes = ", ".join(f"{t}s: {b / 1e6:.1f} MB" for t, b in soak["sizes_bytes"])
        print(
            f"\nsoak at {soak['rate']:,.0f} events/s, {soak['written']:,} events: outbox table "
            f"size {sizes}; {soak['backlog_at_end']} rows left 5 s after the writers stopped"
        )


if __name__ == "__main__":
    os.environ.setdefault("PYTHONWARNINGS", "ignore")
    main()
