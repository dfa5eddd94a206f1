"""The limits a relay cannot beat on this machine, for the messages it will send.

* raw producer: confluent-kafka with the relay's own producer settings
  (``outbox_relay.kafka.producer_config``) sending the same messages the relay sends: same topic
  layout, keys, payload sizes and headers (an ``event_id`` header each), produce to flush, on a
  producer that has delivered one message to the topic already;
* PostgreSQL alone: one connection claiming the same rows as the relay would (``SELECT ... FOR
  UPDATE SKIP LOCKED``, oldest first, in batches of the relay's default ``--batch-size``), then
  marking them (``DELETE``, the relay's default; ``UPDATE ... SET published_at``, what it does
  with ``--retention``) and committing, until the outbox is empty. No Kafka.

The lower limit is the smaller of the raw producer and PostgreSQL claim + DELETE.

    .venv/bin/python bench/limits.py [--events 100000] [--runs 3] [--json out.json]
"""

from __future__ import annotations

import time
import uuid
from typing import Any

import common
import psycopg
from confluent_kafka import Producer

from outbox.envelope import EVENT_ID_HEADER
from outbox_relay.config import RelaySettings
from outbox_relay.kafka import producer_config

#: The relay's own batch size: the same rows in the same batches.
CLAIM_LIMIT = RelaySettings(
    database_url="postgresql://unused", kafka_bootstrap_servers="unused:9092"
).batch_size
CLAIM = f"""
SELECT id, event_id, topic, key, payload, header_names, header_values FROM outbox_events
WHERE published_at IS NULL AND dead_lettered_at IS NULL
ORDER BY id LIMIT {CLAIM_LIMIT}
FOR UPDATE SKIP LOCKED
"""
MARK = {
    "delete": "DELETE FROM outbox_events WHERE id = ANY(%s)",
    "update": "UPDATE outbox_events SET published_at = now() WHERE id = ANY(%s)",
}


def raw_producer(env: common.Env, events: int, size: int) -> float:
    """Events/s of the relay's producer settings sending the same messages; produce to flush."""
    settings = RelaySettings(
        database_url="postgresql://unused", kafka_bootstrap_servers=env.bootstrap
    )
    messages = [
        (common.key(i), common.payload(i, size), [(EVENT_ID_HEADER, str(uuid.uuid4()).encode())])
        for i in range(events)
    ]
    with env.topic() as topic:
        producer = Producer(producer_config(settings) | common.QUIET)
        # Warmed up, as the relay's producer is by its first batch: connected, producer id
        # acquired, the topic known (a message sent at once by a new producer can wait half a
        # second on Tansu).
        producer.produce(topic, value=b"warm-up", key=b"warm-up")
        if producer.flush(30):
            raise RuntimeError("raw producer: the warm-up message was not delivered")
        start = time.perf_counter()
        for k, value, headers in messages:
            while True:
                try:
                    producer.produce(topic, value=value, key=k, headers=headers)
                    break
                except BufferError:
                    producer.poll(0.01)
            producer.poll(0)
        left = producer.flush(120)
        elapsed = time.perf_counter() - start
        if left:
            raise RuntimeError(f"raw producer: {left} messages not delivered")
    return events / elapsed


def pg_claim(env: common.Env, events: int, size: int, mode: str) -> float:
    """Events/s of PostgreSQL alone claiming and marking (``mode``: delete or update) a
    backlog of ``events`` rows on one connection, until none is left."""
    with env.database() as url:
        common.fill(url, "bench-limits", events, size)
        with psycopg.connect(url) as conn:
            done = 0
            start = time.perf_counter()
            while rows := conn.execute(CLAIM).fetchall():
                conn.execute(MARK[mode], ([row[0] for row in rows],))
                conn.commit()
                done += len(rows)
            conn.commit()
            elapsed = time.perf_counter() - start
    if done != events:
        raise RuntimeError(f"PostgreSQL claim: {done} of {events} rows claimed")
    return events / elapsed


def measure_once(env: common.Env, events: int, size: int) -> dict[str, float]:
    return {
        "raw_producer": raw_producer(env, events, size),
        "pg_claim_delete": pg_claim(env, events, size, "delete"),
        "pg_claim_update": pg_claim(env, events, size, "update"),
    }


def summarise(samples: dict[int, list[dict[str, float]]], events: int) -> dict[str, Any]:
    """Medians per payload size, and the lower limit: min(raw producer, claim + DELETE)."""
    sizes = {}
    for size, runs in samples.items():
        med = {name: common.median(run[name] for run in runs) for name in runs[0]}
        sizes[str(size)] = {
            "raw_producer_events_per_s": med["raw_producer"],
            "pg_claim_delete_events_per_s": med["pg_claim_delete"],
            "pg_claim_update_events_per_s": med["pg_claim_update"],
            "lower_limit_events_per_s": min(med["raw_producer"], med["pg_claim_delete"]),
            "runs": runs,
        }
    return {"events": events, "claim_limit": CLAIM_LIMIT, "sizes": sizes}


def measure(env: common.Env, opts: common.Options) -> dict[str, Any]:
    samples: dict[int, list[dict[str, float]]] = {size: [] for size in opts.sizes}
    for run in range(opts.runs):
        for size in opts.sizes:
            samples[size].append(measure_once(env, opts.events, size))
            common.progress(f"limits run {run + 1}/{opts.runs}, {size} B: {samples[size][-1]}")
    return summarise(samples, opts.events)


def size_label(size: str | int) -> str:
    size = int(size)
    return f"{size // 1024} KiB" if size % 1024 == 0 else f"{size} B"


def rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    for size, r in result["sizes"].items():
        lower = r["lower_limit_events_per_s"]
        label = size_label(size)
        out += [
            common.Row(
                "limits",
                f"raw producer, same messages, {label}",
                common.num(r["raw_producer_events_per_s"]),
                "events/s",
            ),
            common.Row(
                "limits",
                f"PostgreSQL claim + DELETE, {label}",
                common.num(r["pg_claim_delete_events_per_s"]),
                "events/s",
            ),
            common.Row(
                "limits",
                f"PostgreSQL claim + UPDATE (--retention), {label}",
                common.num(r["pg_claim_update_events_per_s"]),
                "events/s",
            ),
            common.Row(
                "limits",
                f"lower limit = min(raw, claim + DELETE), {label}",
                common.num(lower),
                "events/s",
            ),
        ]
    return out


if __name__ == "__main__":
    common.standalone(__doc__, "limits", measure, rows)
