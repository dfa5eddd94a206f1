"""The limits a relay cannot beat on this machine, for the messages it will send.

* raw producer: confluent-kafka with the relay's own producer settings
  (``outbox_relay.kafka.producer_config``) sending the same messages the relay sends: same topic
  layout, keys, payload sizes and headers (an ``event_id`` header each), produce to flush, on a
  producer that has delivered one message to the topic already;
* PostgreSQL alone: one connection claiming the same rows as the relay would (``SELECT ... FOR
  UPDATE SKIP LOCKED``, oldest first, in batches of the relay's default ``--batch-size``), then
  marking them and committing, until the outbox is empty. No Kafka. Three markings, each on a
  fresh database: ``DELETE``, the relay's default; the move of a relay with ``--retention``
  since migration 0008 (``DELETE ... RETURNING`` feeding an ``INSERT`` into the table of
  published events, into range partitions made first as a relay with ``--retention 3600``
  makes them; the run fails if a row lands in the default partition); and ``UPDATE ... SET
  published_at``, what a relay with ``--retention`` did before (n/a for the move on a schema
  before migration 0008);
* the claim beside retained events: the relay's own claim (``OutboxSource.claim``, all shards,
  scan floor 0) of 500 rows and of a whole batch, on a backlog of ``--events`` rows of 256 B,
  in three databases with the same history (``--backlog-big`` rows written and published,
  then VACUUM ANALYZE, then the backlog): published rows deleted (none retained), moved to the
  table of published events (retained there), or marked in place (retained in the outbox
  table, as before migration 0008). The claims go round the three databases, each claim
  rolled back, and the medians are shown.

The lower limit is the smaller of the raw producer and PostgreSQL claim + DELETE.

    .venv/bin/python bench/limits.py [--events 100000] [--runs 3] [--backlog-big 1000000]
        [--json out.json]
"""

from __future__ import annotations

import contextlib
import math
import time
import uuid
from collections.abc import Iterator
from typing import Any

import common
import psycopg
from confluent_kafka import Producer

from outbox.envelope import EVENT_ID_HEADER
from outbox.settings import SHARD_COUNT
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.kafka import producer_config
from outbox_relay.ports import Ownership

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
# The relay's move with --retention (outbox_relay.claims._MOVE_PUBLISHED, default names).
MOVE = """
WITH moved AS (
    DELETE FROM outbox_events WHERE id = ANY(%s::bigint[])
    RETURNING id, event_id, topic, key, payload, header_names, header_values, created_at, attempts
)
INSERT INTO outbox_published (id, event_id, topic, key, payload, header_names, header_values,
                              created_at, attempts, published_at)
SELECT id, event_id, topic, key, payload, header_names, header_values, created_at, attempts,
       statement_timestamp()
FROM moved
"""
MARK = {
    "delete": "DELETE FROM outbox_events WHERE id = ANY(%s)",
    "move": MOVE,
    "update": "UPDATE outbox_events SET published_at = now() WHERE id = ANY(%s)",
}
#: The retention whose partitions the move fills (the drain's --retention).
MOVE_RETENTION = 3600.0
#: How many rows in the default partition of published events: rows there had no partition.
DEFAULT_PARTITION_ROWS = "SELECT count(*) FROM outbox_published_default"
PREPARE = "SELECT outbox_published_prepare(make_interval(secs => %s), make_interval(secs => %s))"


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


def prepare_partitions(conn: psycopg.Connection[Any], retention: float) -> None:
    """The partitions of published events a relay with ``retention`` makes ahead of need."""
    from outbox_relay.retention import PARTITIONS_AHEAD

    span = common.partition_span(retention)
    conn.execute(PREPARE, (span, span * PARTITIONS_AHEAD))


def default_partition_rows(conn: psycopg.Connection[Any]) -> int:
    row = conn.execute(DEFAULT_PARTITION_ROWS).fetchone()
    return int(row[0]) if row else -1


def pg_claim(env: common.Env, events: int, size: int, mode: str) -> float:
    """Events/s of PostgreSQL alone claiming and marking (``mode``: delete, move or update) a
    backlog of ``events`` rows on one connection, until none is left; NaN for the move on a
    schema without the table of published events."""
    with env.database() as url:
        common.fill(url, "bench-limits", events, size)
        with psycopg.connect(url) as conn:
            if mode == "move":
                if not common.published_table(conn):
                    return math.nan
                prepare_partitions(conn, MOVE_RETENTION)
                conn.commit()
            done = 0
            start = time.perf_counter()
            while rows := conn.execute(CLAIM).fetchall():
                conn.execute(MARK[mode], ([row[0] for row in rows],))
                conn.commit()
                done += len(rows)
            conn.commit()
            elapsed = time.perf_counter() - start
            if mode == "move" and (stray := default_partition_rows(conn)):
                raise RuntimeError(
                    f"PostgreSQL claim + move: {stray} rows in the default partition"
                )
    if done != events:
        raise RuntimeError(f"PostgreSQL claim: {done} of {events} rows claimed")
    return events / elapsed


def measure_once(env: common.Env, events: int, size: int) -> dict[str, float]:
    return {
        "raw_producer": raw_producer(env, events, size),
        "pg_claim_delete": pg_claim(env, events, size, "delete"),
        "pg_claim_move": pg_claim(env, events, size, "move"),
        "pg_claim_update": pg_claim(env, events, size, "update"),
    }


# --- the claim beside retained events ------------------------------------------------------

#: Claims per database and limit (after one unmeasured claim each), each database first in turn.
CLAIM_REPEATS = 24
#: How the retained rows were published, per database: deleted (none retained), moved to the
#: table of published events, marked in place. Each statement publishes every row written.
PUBLISH_ALL = {
    "none": "DELETE FROM outbox_events",
    "published_table": """
WITH moved AS (
    DELETE FROM outbox_events
    RETURNING id, event_id, topic, key, payload, header_names, header_values, created_at, attempts
)
INSERT INTO outbox_published (id, event_id, topic, key, payload, header_names, header_values,
                              created_at, attempts, published_at)
SELECT id, event_id, topic, key, payload, header_names, header_values, created_at, attempts,
       statement_timestamp() - make_interval(secs => %(spread)s * (1 - id::float8 / %(last)s))
FROM moved
""",
    "in_place": """
UPDATE outbox_events
SET published_at = statement_timestamp() - make_interval(secs => %(spread)s
                                                         * (1 - id::float8 / %(last)s))
""",
}
#: The published times spread over this many seconds before now: within the partitions a
#: relay with --retention 3600 makes (they start at least one span, 450 s, before now).
PUBLISHED_SPREAD_S = 400.0
#: Member lock of the bench's "ownership session" (any pair no relay uses here).
MEMBER = (917_313, 1)


@contextlib.contextmanager
def retained_database(
    env: common.Env, case: str, retained: int, backlog: int, size: int
) -> Iterator[str | None]:
    """A database whose outbox saw ``retained`` rows written and published (``case``), then
    ``backlog`` rows written; None when the schema has no table of published events."""
    with env.database() as url:
        with psycopg.connect(url, autocommit=True) as conn:
            if case == "published_table" and not common.published_table(conn):
                yield None
                return
            common.insert_rows(conn, "bench-retained", retained, size)
            if case == "published_table":
                prepare_partitions(conn, MOVE_RETENTION)
            spread = {"spread": PUBLISHED_SPREAD_S, "last": retained}
            conn.execute(PUBLISH_ALL[case], spread if "%(" in PUBLISH_ALL[case] else None)
            if case == "published_table" and (stray := default_partition_rows(conn)):
                raise RuntimeError(f"retained rows: {stray} in the default partition")
            common.insert_rows(conn, "bench-backlog", backlog, size, first=retained)
            conn.execute("VACUUM ANALYZE outbox_events")
            if common.published_table(conn):
                conn.execute("VACUUM ANALYZE outbox_published")
            with contextlib.suppress(psycopg.errors.InsufficientPrivilege):
                conn.execute("CHECKPOINT")
        yield url


def claim_retained(env: common.Env, opts: common.Options) -> dict[str, Any]:
    """Milliseconds of the relay's claim (medians) beside none, ``--backlog-big`` retained rows
    in the table of published events, and as many marked in place."""
    backlog, retained, size = opts.events, opts.backlog_big, 256
    claim_limits = sorted({min(500, backlog), min(CLAIM_LIMIT, backlog)})
    cases = tuple(PUBLISH_ALL)
    times: dict[str, dict[int, list[float]]] = {c: {n: [] for n in claim_limits} for c in cases}
    with contextlib.ExitStack() as stack:
        urls = {}
        for case in cases:
            common.progress(f"claim beside retained rows: {case}, {retained:,} rows")
            url = stack.enter_context(retained_database(env, case, retained, backlog, size))
            if url is not None:
                urls[case] = url
        sources = {}
        for case, url in urls.items():
            settings = RelaySettings(database_url=url, kafka_bootstrap_servers="unused:9092")
            source = OutboxSource(settings)
            source.connect()
            stack.callback(source.close)
            holder = stack.enter_context(psycopg.connect(url, autocommit=True))
            holder.execute("SELECT pg_advisory_lock(%s, %s)", MEMBER)
            sources[case] = source
        ownership = Ownership(frozenset(range(SHARD_COUNT)), *MEMBER)
        for repeat in range(CLAIM_REPEATS + 1):
            turn = list(sources.items())
            turn = turn[repeat % len(turn) :] + turn[: repeat % len(turn)]  # each first in turn
            for limit in claim_limits:
                for case, source in turn:
                    start = time.perf_counter()
                    rows = source.claim(limit, ownership=ownership)
                    elapsed = time.perf_counter() - start
                    source.release()
                    if len(rows) != limit:
                        raise RuntimeError(f"claim {case}: {len(rows)} of {limit} rows")
                    if repeat:  # the first round warms the caches
                        times[case][limit].append(1000 * elapsed)
    out: dict[str, Any] = {"backlog": backlog, "retained": retained, "size": size, "claims": {}}
    for limit in claim_limits:
        med = {case: common.median(times[case][limit]) for case in cases}
        out["claims"][str(limit)] = {
            "none_ms": med["none"],
            "published_table_ms": med["published_table"],
            "in_place_ms": med["in_place"],
            "published_table_ratio": common.ratio(med["published_table"], med["none"]),
            "in_place_ratio": common.ratio(med["in_place"], med["none"]),
            "samples_ms": {case: times[case][limit] for case in cases},
        }
    return out


def summarise(samples: dict[int, list[dict[str, float]]], events: int) -> dict[str, Any]:
    """Medians per payload size, and the lower limit: min(raw producer, claim + DELETE)."""
    sizes = {}
    for size, runs in samples.items():
        med = {name: common.median(run[name] for run in runs) for name in runs[0]}
        sizes[str(size)] = {
            "raw_producer_events_per_s": med["raw_producer"],
            "pg_claim_delete_events_per_s": med["pg_claim_delete"],
            "pg_claim_move_events_per_s": med["pg_claim_move"],
            "pg_claim_update_events_per_s": med["pg_claim_update"],
            # each run's ratio to DELETE measured beside it, then their median
            "move_to_delete": common.median(
                common.ratio(run["pg_claim_move"], run["pg_claim_delete"]) for run in runs
            ),
            "update_to_delete": common.median(
                common.ratio(run["pg_claim_update"], run["pg_claim_delete"]) for run in runs
            ),
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
    return summarise(samples, opts.events) | {"claim": claim_retained(env, opts)}


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
                f"PostgreSQL claim + move (--retention), {label}",
                common.num(r["pg_claim_move_events_per_s"]),
                "events/s",
                f"{common.num(r['move_to_delete'], 2)} of DELETE, same runs",
            ),
            common.Row(
                "limits",
                f"PostgreSQL claim + UPDATE (--retention before 0008), {label}",
                common.num(r["pg_claim_update_events_per_s"]),
                "events/s",
                f"{r['update_to_delete']:.2f} of DELETE, same runs",
            ),
            common.Row(
                "limits",
                f"lower limit = min(raw, claim + DELETE), {label}",
                common.num(lower),
                "events/s",
            ),
        ]
    if "claim" in result:
        out += claim_rows(result["claim"])
    return out


def claim_rows(result: dict[str, Any]) -> list[common.Row]:
    out = []
    retained = common.num(result["retained"])
    for limit, r in result["claims"].items():
        where = f"claim of {int(limit):,} of {result['backlog']:,} waiting"
        out += [
            common.Row("limits", f"{where}, none retained", common.num(r["none_ms"], 2), "ms"),
            common.Row(
                "limits",
                f"{where}, {retained} in the published table",
                common.num(r["published_table_ms"], 2),
                "ms",
                f"{common.num(r['published_table_ratio'], 2)} of none retained",
            ),
            common.Row(
                "limits",
                f"{where}, {retained} marked in place",
                common.num(r["in_place_ms"], 2),
                "ms",
                f"{common.num(r['in_place_ratio'], 2)} of none retained",
            ),
        ]
    return out


if __name__ == "__main__":
    common.standalone(__doc__, "limits", measure, rows)
