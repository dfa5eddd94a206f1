"""Helpers for the tests of an application that writes events: what a transaction wrote, a relay
that drains the outbox once, and what a topic holds.

    from outbox.testkit import outbox_events

    with Session(engine) as session, session.begin():
        place_order(session, "book")
        [event] = outbox_events(session, topic="orders")
        assert event.payload == {"item": "book"}

The pytest plugin (:mod:`outbox.pytest_plugin`) gives these with the servers already bound:
the ``relay_once`` and ``consumed`` fixtures.
"""

from __future__ import annotations

import json
import time
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

from outbox.connections import execute
from outbox.envelope import EVENT_ID_HEADER
from outbox.errors import OutboxError
from outbox.settings import OutboxSettings
from outbox.writer import default

if TYPE_CHECKING:
    from outbox.connections import SyncDB


@dataclass(frozen=True, slots=True)
class Message:
    """An event as a test sees it, in the outbox or on a topic: the key decoded as UTF-8 (bytes
    if it is not), the payload decoded as JSON (bytes if it is not JSON)."""

    event_id: str
    topic: str
    key: str | bytes | None
    payload: Any
    headers: dict[str, bytes] = field(default_factory=dict)
    #: The payload exactly as stored and sent.
    raw: bytes = b""
    #: Where it is on the topic (``consumed`` only).
    partition: int | None = None
    offset: int | None = None


def decoded(
    event_id: str,
    topic: str,
    key: bytes | None,
    payload: bytes,
    headers: dict[str, bytes],
    **position: int | None,
) -> Message:
    """A :class:`Message` from the bytes as stored and sent."""
    try:
        value: Any = json.loads(payload)
    except ValueError:
        value = payload
    text_key: str | bytes | None = key
    if key is not None:
        try:
            text_key = key.decode()
        except UnicodeDecodeError:
            text_key = key
    return Message(event_id, topic, text_key, value, headers, payload, **position)


# Rows visible to this transaction whose writer is still in progress can only be its own (or of
# its savepoints): that is what "written by this transaction" means here, savepoints included.
_WRITTEN_HERE = """
SELECT e.event_id::text, e.topic, e.key, e.payload, e.header_names, e.header_values
FROM {events} AS e
WHERE pg_xact_status((((pg_current_xact_id()::text::bigint >> 32) << 32)
                      + e.xmin::text::bigint)::text::xid8) = 'in progress'
  AND (%s::text IS NULL OR e.topic = %s)
ORDER BY e.id
"""


def outbox_events(
    db: SyncDB, topic: str | None = None, *, settings: OutboxSettings | None = None
) -> list[Message]:
    """The events ``db``'s current transaction has written so far (not yet committed), in the
    order written; only those of ``topic`` if given. ``db`` is anything ``outbox.add`` takes."""
    sql = (settings or default().settings).sql(_WRITTEN_HERE, events="events")
    rows = execute(db, sql, (topic, topic)).rows
    return [
        decoded(event_id, topic_, key, bytes(payload), dict(zip(names, values, strict=True)))
        for event_id, topic_, key, payload, names, values in rows
    ]


class RelayOnceError(OutboxError, AssertionError):
    """``relay_once`` left events unpublished: the message names them and their last error."""


def relay_once(
    database_url: str,
    kafka_bootstrap_servers: str,
    *,
    settings: OutboxSettings | None = None,
    create_topics: bool = True,
    **relay_settings: Any,
) -> list[Message]:
    """Run a relay in this process until the outbox is drained, and return what it published,
    in the order it was written. Raises :class:`RelayOnceError` if an event could not be
    published (a payload the broker refused, a topic that does not exist...), naming it and the
    error. With ``create_topics``, the events' topics that do not exist yet are created first
    (3 partitions), as a test broker starts with none.

    ``relay_settings`` are :class:`outbox_relay.config.RelaySettings` fields (``batch_size``...).
    """
    from outbox import migrator, urls
    from outbox_relay.config import RelaySettings
    from outbox_relay.kafka import KafkaPublisher
    from outbox_relay.loop import Relay
    from outbox_relay.signals import StopSignal

    outbox_settings = settings or default().settings
    # One failed delivery is enough to tell (the row is dead-lettered, and named below).
    relay_settings = {"delivery_timeout": 10.0, "max_attempts": 1, **relay_settings}
    config = RelaySettings(
        database_url=urls.to_sqlalchemy(database_url),
        kafka_bootstrap_servers=kafka_bootstrap_servers,
        outbox=outbox_settings,
        exit_when_idle=True,
        **relay_settings,
    )
    libpq_url = urls.to_libpq(database_url)
    waiting = _unpublished(libpq_url, outbox_settings)
    if create_topics:
        ensure_topics(kafka_bootstrap_servers, {row[1] for row in waiting})
    stop = StopSignal()
    relay = Relay(config, KafkaPublisher(config), stop)
    try:
        relay.connect()
        migrator.require_current(relay.batches.source.connection, outbox_settings)
        relay.batches.source.release()
        relay.run()
    finally:
        relay.leave()
        relay.shutdown()
        stop.close()
    left = {row[0]: row for row in _unpublished(libpq_url, outbox_settings)}
    if left:
        raise RelayOnceError(
            f"{len(left)} event(s) were not published: "
            + "; ".join(f"{r[0]} to {r[1]!r}: {r[-1] or 'not tried'}" for r in left.values())
        )
    return [
        decoded(event_id, topic, key, bytes(payload), dict(zip(names, values, strict=True)))
        for event_id, topic, key, payload, names, values, _ in waiting
        if event_id not in left
    ]


def _message(topic: str, msg: Any) -> Message:
    headers = {str(k): _bytes(v) for k, v in msg.headers() or []}
    return decoded(
        headers.get(EVENT_ID_HEADER, b"").decode(),
        topic,
        msg.key(),
        _bytes(msg.value()),
        headers,
        partition=msg.partition(),
        offset=msg.offset(),
    )


def _bytes(value: str | bytes | None) -> bytes:
    return value.encode() if isinstance(value, str) else value or b""


_UNPUBLISHED = """
SELECT event_id::text, topic, key, payload, header_names, header_values, last_error
FROM {events} WHERE published_at IS NULL ORDER BY id
"""


def ensure_topics(bootstrap: str, topics: set[str]) -> None:
    """Create those of ``topics`` that do not exist yet (3 partitions each)."""
    from confluent_kafka import KafkaError, KafkaException
    from confluent_kafka.admin import AdminClient
    from confluent_kafka.cimpl import NewTopic

    if not topics:
        return
    admin = AdminClient({"bootstrap.servers": bootstrap, "log_level": 3})
    futures = admin.create_topics([NewTopic(t, num_partitions=3) for t in sorted(topics)])
    for future in futures.values():
        try:
            future.result(timeout=30)
        except KafkaException as exc:
            if exc.args[0].code() != KafkaError.TOPIC_ALREADY_EXISTS:
                raise


def _unpublished(libpq_url: str, settings: OutboxSettings) -> list[tuple[Any, ...]]:
    import psycopg

    with psycopg.connect(libpq_url) as conn:
        return conn.execute(settings.sql(_UNPUBLISHED, events="events")).fetchall()


def consumed(kafka_bootstrap_servers: str, topic: str, *, timeout: float = 10.0) -> list[Message]:
    """Every message on ``topic`` from its start, decoded, by partition and then offset.

    Reads up to each partition's end as the broker reports it when called, then a little longer
    (a broker can report an end that lags what is readable); a topic that does not exist is
    waited for up to ``timeout`` and then reported as an error.
    """
    from confluent_kafka import Consumer, TopicPartition

    consumer = Consumer(
        {
            "bootstrap.servers": kafka_bootstrap_servers,
            "group.id": f"outbox-testkit-{time.monotonic_ns()}",
            "enable.auto.commit": False,
            "log_level": 3,
        }
    )
    try:
        metadata = consumer.list_topics(topic, timeout=timeout)
        described = metadata.topics.get(topic)
        if described is None or described.error is not None or not described.partitions:
            raise LookupError(f"topic {topic!r} does not exist on {kafka_bootstrap_servers}")
        partitions = sorted(described.partitions)
        ends = {
            p: consumer.get_watermark_offsets(TopicPartition(topic, p), timeout)[1]
            for p in partitions
        }
        consumer.assign([TopicPartition(topic, p, 0) for p in partitions])
        messages: list[Message] = []
        positions = dict.fromkeys(partitions, 0)
        deadline = time.monotonic() + timeout
        quiet_until: float | None = None
        while time.monotonic() < deadline:
            msg = consumer.poll(0.05)
            if msg is not None and msg.error() is None:
                messages.append(_message(topic, msg))
                positions[msg.partition() or 0] = (msg.offset() or 0) + 1
                quiet_until = None
            caught_up = all(positions[p] >= ends[p] for p in partitions)
            if caught_up and quiet_until is None:
                quiet_until = time.monotonic() + 0.3
            if quiet_until is not None and time.monotonic() > quiet_until:
                break
    finally:
        consumer.close()
    return sorted(messages, key=lambda m: (m.partition or 0, m.offset or 0))
