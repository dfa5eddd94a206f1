"""Golden test: the relay's ``--record-format debezium`` records are Debezium's, byte for byte.

The same logical events go two ways onto the same topics: through Debezium (its documented
outbox table with ``payload jsonb``, PostgreSQL's logical decoding, Kafka Connect standalone
with the PostgreSQL connector and the Outbox Event Router, configured as
:mod:`outbox.kafka_connect` pins it), then through ``outbox.debezium.add_many`` and the relay.
Paired by the ``id`` header, every record must match in topic, partition, key, value and the
full header list. Needs Java 17+ (and Maven the first time, for the jars).
"""

from __future__ import annotations

import asyncio
import itertools
import shutil
import tempfile
import time
import uuid
from collections.abc import Callable, Iterable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Message, TopicPartition
from confluent_kafka.admin import AdminClient, NewTopic

from outbox import apache_kafka, debezium, kafka_connect, testing
from outbox.consumer import debezium_id_or_position, event_id_or_position
from tests.acceptance.relay_harness import run_relay

pytestmark = pytest.mark.kafka

PARTITIONS = 3
#: Aggregate types (one topic each), ids (keys) and event types the events cycle through.
AGGREGATES = ("order", "customer", "shipment.line")
IDS = ("42", "A-17", "kunde-ü-3", "0001", "x" * 255, "🛒")
TYPES = ("Created", "Updated", "Zahlung_Eingegangen", "Cancelled")
#: Payloads as applications give them: objects, and JSON text whose bytes jsonb normalizes
#: (spacing, key order, duplicate keys, numbers, escapes).
PAYLOADS: tuple[Any, ...] = (
    {"b": 1, "a": {"z": [1, 2, {"y": None}], "x": True}, "longer_key": "v"},
    {"name": "Zoë 🎉 日本語", "snowman": "\u2603", "empty": "", "list": []},
    '{"price": 1.50, "exp": 1e3, "neg_zero": -0, "small": 1.0e-5, "negexp": -2.5E+2}',
    '{"big": 123456789012345678901234567890123456789, "neg": -98765432109876543210}',
    '{"dup": 1, "other": true, "dup": 2}',
    '  {\n\t"spaced" :  [ 1 ,\t2 , { "k" : "v" } ] ,"z":{}}  ',
    r'{"esc": "q \" b \\ s \/ t \t n \n e \u00e9 smile \ud83d\ude00 ctl \u001f"}',
    '{"bbb": 1, "a": 2, "cc": 3, "A": 4, "aa": 5}',
    '"just a string"',
    "42",
    "null",
    '[1, [2, [3, {"deep": {"deeper": [true, false, null]}}]]]',
    b'{"bytes": "yes", "n": 0.10}',
    {"float": 1.5, "int": 2**70, "neg": -3, "nested": {"list": [{"a": 1}, {"b": [None]}]}},
)
EVENTS = 64
#: Written with add, add_async, add_many_async and add_many, a quarter each.
QUARTER = EVENTS // 4
#: Connect starts in 10 to 20 s on two busy cores; the whole test stays under two minutes.
DEBEZIUM_TIMEOUT = 90


@dataclass(frozen=True)
class Record:
    topic: str
    partition: int
    offset: int
    key: bytes | None
    value: bytes | None
    headers: tuple[tuple[str, bytes | None], ...]
    #: What a consume loop reads as the message id with debezium_id_or_position (not compared).
    message_id: str
    #: ... and with its default, event_id_or_position, which does not read a header named id.
    default_message_id: str

    @property
    def event_id(self) -> str:
        return dict(self.headers)["id"].decode()  # type: ignore[union-attr]


def logical_events(prefix: str) -> list[debezium.DebeziumEvent]:
    """EVENTS events over every aggregate type, id, event type and payload."""
    events = []
    for i in range(EVENTS):
        payload = PAYLOADS[i % len(PAYLOADS)]
        if isinstance(payload, dict):
            payload = {**payload, "n": i}
        events.append(
            debezium.DebeziumEvent(
                aggregate_type=f"{prefix}-{AGGREGATES[i % len(AGGREGATES)]}",
                aggregate_id=IDS[i % len(IDS)],
                event_type=TYPES[i % len(TYPES)],
                payload=payload,
            )
        )
    return events


def _fields(event: debezium.DebeziumEvent) -> dict[str, Any]:
    return {
        f: getattr(event, f) for f in ("aggregate_type", "aggregate_id", "event_type", "payload")
    }


def write_through_api(
    database_url: str, events: Sequence[debezium.DebeziumEvent]
) -> list[uuid.UUID]:
    """The events through every entry point of outbox.debezium, in order; their ids."""
    one, two, three = QUARTER, 2 * QUARTER, 3 * QUARTER
    with psycopg.connect(database_url) as conn:
        ids = [debezium.add(conn, **_fields(e)) for e in events[:one]]

    async def write_async() -> list[uuid.UUID]:
        async with await psycopg.AsyncConnection.connect(database_url) as conn:
            written = [await debezium.add_async(conn, **_fields(e)) for e in events[one:two]]
            return written + await debezium.add_many_async(conn, events[two:three])

    ids += asyncio.run(write_async())
    with psycopg.connect(database_url) as conn:
        return ids + debezium.add_many(conn, events[three:])


def create_topics(bootstrap: str, topics: Sequence[str]) -> None:
    admin = AdminClient({"bootstrap.servers": bootstrap})
    new = [NewTopic(t, num_partitions=PARTITIONS, replication_factor=1) for t in topics]
    for future in admin.create_topics(new).values():
        future.result(timeout=30)


def write_to_debezium_table(
    database_url: str, events: Sequence[debezium.DebeziumEvent], ids: Sequence[str]
) -> None:
    """The events in Debezium's table with the same ids, each inserted and deleted in its
    transaction (Debezium's documented pattern: the router reads the insert from the WAL)."""
    with psycopg.connect(database_url) as conn:
        for event, event_id in zip(events, ids, strict=True):
            with conn.transaction():
                conn.execute(
                    "INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)"
                    " VALUES (%s, %s, %s, %s, %s::jsonb)",
                    (
                        event_id,
                        event.aggregate_type,
                        event.aggregate_id,
                        event.event_type,
                        debezium.json_text(event.payload).decode(),
                    ),
                )
                conn.execute("DELETE FROM outboxevent WHERE id = %s", (event_id,))


@dataclass
class TopicReader:
    """Every record of some topics from given offsets, partitions assigned (no group)."""

    bootstrap: str
    topics: Sequence[str]

    def read(
        self,
        start: dict[tuple[str, int], int],
        count: int,
        timeout: float,
        alive: Callable[[], None] = lambda: None,
    ) -> list[Record]:
        """Records until ``count`` were read (or the timeout), then until 2 s pass without
        one, so that a duplicate written late is read too."""
        consumer = Consumer(
            {"bootstrap.servers": self.bootstrap, "group.id": "golden", "enable.auto.commit": False}
        )
        consumer.assign(
            [
                TopicPartition(t, p, start.get((t, p), 0))
                for t in self.topics
                for p in range(PARTITIONS)
            ]
        )
        records: list[Record] = []
        deadline = time.monotonic() + timeout
        quiet_until = float("inf")
        try:
            while time.monotonic() < min(deadline, quiet_until):
                alive()
                message = consumer.poll(0.2)
                if message is not None and message.error() is None:
                    records.append(_record(message))
                    if len(records) >= count:
                        quiet_until = time.monotonic() + 2
        finally:
            consumer.close()
        return records


def ends(records: Iterable[Record]) -> dict[tuple[str, int], int]:
    """The offset after the last of ``records`` in each partition."""
    after: dict[tuple[str, int], int] = {}
    for r in records:
        after[(r.topic, r.partition)] = max(after.get((r.topic, r.partition), 0), r.offset + 1)
    return after


def _record(message: Message) -> Record:
    headers = tuple(message.headers() or ())
    return Record(
        message.topic(),
        message.partition(),
        message.offset(),
        message.key(),
        message.value(),
        headers,
        debezium_id_or_position(message),
        event_id_or_position(message),
    )


def differences(ours: Sequence[Record], theirs: Sequence[Record]) -> list[str]:
    """What differs between the relay's records and Debezium's (the offset may), every copy
    against every copy; an event missing on either side is a difference too."""
    mine = {r.event_id: [r] for r in ours}
    copies: dict[str, list[Record]] = {}
    for r in theirs:
        copies.setdefault(r.event_id, []).append(r)
    found = [f"{i}: only Debezium wrote it" for i in copies.keys() - mine.keys()]
    found += [f"{i}: only the relay wrote it" for i in mine.keys() - copies.keys()]
    for event_id in mine.keys() & copies.keys():
        for relay, dbz in itertools.product(mine[event_id], copies[event_id]):
            for field in ("topic", "partition", "key", "value", "headers"):
                a, b = getattr(relay, field), getattr(dbz, field)
                if a != b:
                    found.append(f"{event_id} {field}: relay {a!r} != Debezium {b!r}")
    return found


@pytest.fixture(scope="module")
def connect_jars() -> Path:
    """Debezium's jars, fetched once; skips without Java (or without Maven the first time)."""
    if shutil.which("java") is None:
        pytest.skip("Kafka Connect needs Java 17+ on the PATH")
    try:
        return kafka_connect.jars()
    except apache_kafka.JavaToolMissing as exc:
        pytest.skip(f"Debezium's jars are not cached and cannot be fetched: {exc}")


@pytest.fixture
def logical_pg() -> Iterator[kafka_connect.LogicalPostgres]:
    """A PostgreSQL decoding its WAL, outside pytest's base directory: its server runs as
    another user when we are root, and each pytest session closes that directory to others."""
    with (
        tempfile.TemporaryDirectory(prefix="outbox-golden-") as directory,
        kafka_connect.logical_postgres(Path(directory)) as pg,
    ):
        yield pg


def test_relay_records_are_debeziums_byte_for_byte(
    connect_jars: Path,
    logical_pg: kafka_connect.LogicalPostgres,
    database_url: str,
    kafka_bootstrap: str,
    tmp_path: Path,
) -> None:
    """For every event: topic, partition, key, value and header list identical."""
    prefix = testing.unique_name("golden").replace("_", "-")
    events = logical_events(prefix)
    topics = sorted({debezium.topic_of(e.aggregate_type) for e in events})
    create_topics(kafka_bootstrap, topics)
    ids = [str(i) for i in write_through_api(database_url, events)]
    reader = TopicReader(kafka_bootstrap, topics)

    with kafka_connect.replicated_database(
        logical_pg.url, kafka_connect.OUTBOX_TABLE, "outboxevent"
    ) as dbz_url:
        write_to_debezium_table(dbz_url, events, ids)
        worker = kafka_connect.worker_properties(kafka_bootstrap, tmp_path / "connect")
        connector = kafka_connect.connector_properties(dbz_url, logical_pg.port, "outboxevent")
        with kafka_connect.ConnectStandalone(tmp_path / "connect", worker, connector) as connect:
            reader.read({}, EVENTS, DEBEZIUM_TIMEOUT, alive=connect.check)
    # Connect has stopped: everything on the topics now is Debezium's (duplicates included).
    theirs = reader.read({}, EVENTS, 30)
    assert len({r.event_id for r in theirs}) == EVENTS, connect.log_tail()

    relay = run_relay(
        database_url, kafka_bootstrap, "--record-format", "debezium", "--exit-when-idle"
    )
    assert relay.returncode == 0, relay.stdout + relay.stderr
    ours = reader.read(ends(theirs), EVENTS, 30)

    assert sorted(r.event_id for r in ours) == sorted(ids)  # once each, as the relay ran once
    found = differences(ours, theirs)
    print(f"\ncompared {len(ours)} events (relay) with {len(theirs)} records (Debezium) on")
    print(f"topic, partition, key, value and headers: {len(found)} differences")
    print("\n".join(found))
    assert found == []
    assert {r.headers[0][0] for r in ours} == {"id"}
    # The values are jsonb's text, not the text written: duplicate keys, numbers, key order.
    values = {r.value for r in ours}
    assert b'{"dup": 2, "other": true}' in values
    assert (
        b'{"exp": 1000, "price": 1.50, "small": 0.000010, "negexp": -250, "neg_zero": 0}' in values
    )
    # A consume loop told to read Debezium's id deduplicates both producers' records on it.
    assert [r.message_id for r in ours] == [r.event_id for r in ours]
    assert [r.message_id for r in theirs] == [r.event_id for r in theirs]
    assert all(r.default_message_id.startswith(r.topic + "/") for r in [*ours, *theirs])
