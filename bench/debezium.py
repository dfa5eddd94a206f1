"""Debezium beside the relay: what the ``peers`` section runs it on and with.

The machinery (a PostgreSQL decoding its WAL, a database with a publication and a slot, Kafka
Connect standalone with Debezium's connector and Outbox Event Router) is
:mod:`outbox.kafka_connect`, shared with the golden tests; here are the bench's choices:

* Debezium's conventional outbox table with a ``bytea`` payload (the bench's payloads are not
  JSON), and the bench's rows;
* the worker tuned as a user would for latency (JVM of ``connect-standalone.sh``, no linger,
  a 5 ms poll interval), the value written as it is (``ByteArrayConverter``) and the aggregate
  type as the topic itself;
* CPU time of processes from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import psycopg

from outbox import kafka_connect
from outbox.kafka_connect import DEBEZIUM_VERSION

__all__ = ["DEBEZIUM_VERSION"]  # peers records it

#: What ``bin/connect-standalone.sh`` gives the JVM (its heap, and kafka-run-class.sh's
#: collector settings): the Connect worker a user would start.
JVM_OPTIONS = (
    "-Xms256m",
    "-Xmx2g",
    "-server",
    "-XX:+UseG1GC",
    "-XX:MaxGCPauseMillis=20",
    "-XX:InitiatingHeapOccupancyPercent=35",
    "-XX:+ExplicitGCInvokesConcurrent",
    "-Djava.awt.headless=true",
    # Warnings only, as the relay runs with --log-level warning: logging costs CPU in both.
    "-Dorg.slf4j.simpleLogger.defaultLogLevel=warn",
)
#: Debezium's ``poll.interval.ms``: its task waits this long for a batch to fill before it hands
#: what it has to Connect (default 500 ms, which at 200 events/s is most of the latency). 5 ms,
#: the relay's --poll-interval of the latency runs, is Debezium tuned for latency.
POLL_INTERVAL_MS = 5
#: The relay's producer does not linger (it flushes each batch); Connect's producer is told the
#: same, instead of Kafka 4's default of 5 ms.
LINGER_MS = 0


# --- PostgreSQL decoding its WAL ---------------------------------------------------------------


@dataclass
class LogicalPostgres(kafka_connect.LogicalPostgres):
    def cpu_seconds(self) -> float:
        """CPU time of the server so far: every live postgres process, plus what the postmaster
        reaped of its exited children (backends that disconnected)."""
        return cpu_seconds(self.process.pid, with_reaped=True)


@contextlib.contextmanager
def logical_postgres(directory: Path) -> Iterator[LogicalPostgres]:
    """:func:`outbox.kafka_connect.logical_postgres`, with its CPU time."""
    with kafka_connect.logical_postgres(directory) as pg:
        yield LogicalPostgres(pg.url, pg.port, pg.process)


# --- Debezium's outbox table --------------------------------------------------------------------

TABLE = """
CREATE TABLE outboxevent (
    id uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    payload bytea
)
"""
# The rows of common.INSERT_ROWS in Debezium's table: the topic as the aggregate type (the
# router routes on it), the key as the aggregate id (the router's message key), the same
# payload bytes; ids are UUIDv7, as outbox.add's.
INSERT_ROWS = """
INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
SELECT uuidv7(), %(topic)s, 'key-' || mod(i, %(keys)s), 'OrderPlaced',
       convert_to(rpad('{"order_id": ' || i || ', "status": "placed"}', %(size)s), 'UTF8')
FROM (SELECT %(first)s::bigint + %(step)s::bigint * g AS i
      FROM generate_series(0, %(events)s - 1) AS g) AS rows
RETURNING id
"""
WARM_UP = """
INSERT INTO outboxevent (id, aggregatetype, aggregateid, type, payload)
VALUES (uuidv7(), %s, 'warm-up', 'WarmUp', %s) RETURNING id
"""
DELETE = "DELETE FROM outboxevent WHERE id = ANY(%s)"


def insert_rows(
    conn: psycopg.Connection[Any],
    topic: str,
    events: int,
    size: int,
    *,
    first: int = 0,
    step: int = 1,
    delete: bool = True,
) -> None:
    """Events as a Debezium outbox writes them: inserted and, with ``delete``, deleted again in
    the same transaction (Debezium's documented pattern: the WAL keeps the insert, the router
    ignores the delete, the table stays empty)."""
    params = {"topic": topic, "keys": common.KEYS, "size": size}
    params |= {"first": first, "step": step, "events": events}
    ids = [row[0] for row in conn.execute(INSERT_ROWS, params).fetchall()]
    if delete:
        conn.execute(DELETE, (ids,))


def warm_up(database_url: str, topic: str, value: bytes) -> None:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(WARM_UP, (topic, value)).fetchone()
        assert row is not None
        conn.execute(DELETE, ([row[0]],))


@contextlib.contextmanager
def outbox_database(server: str) -> Iterator[str]:
    """A database holding Debezium's outbox table, its publication and replication slot
    (:func:`outbox.kafka_connect.replicated_database`)."""
    with kafka_connect.replicated_database(server, TABLE, "outboxevent") as url:
        yield url


# --- Kafka Connect standalone ------------------------------------------------------------------


def jars() -> Path:
    return kafka_connect.jars()


def worker_properties(bootstrap: str, directory: Path) -> dict[str, str]:
    return kafka_connect.worker_properties(bootstrap, directory) | {
        # The router's key is the aggregate id (a string), its value the payload column (bytea):
        # written as they are, the messages carry the same bytes as the relay's.
        "value.converter": "org.apache.kafka.connect.converters.ByteArrayConverter",
        "producer.linger.ms": str(LINGER_MS),
    }


def connector_properties(database_url: str, port: int) -> dict[str, str]:
    properties = kafka_connect.connector_properties(database_url, port, "outboxevent")
    # The bench's connector is Debezium's defaults: its context headers, no type header.
    del properties["extended.headers.enabled"]
    del properties["transforms.outbox.table.fields.additional.placement"]
    return properties | {
        "poll.interval.ms": str(POLL_INTERVAL_MS),
        # aggregatetype names the topic itself (not outbox.event.<aggregatetype>).
        "transforms.outbox.route.topic.replacement": "${routedByValue}",
    }


class ConnectStandalone(kafka_connect.ConnectStandalone):
    """The bench's worker running the outbox connector; log in its directory."""

    def __init__(self, directory: Path, bootstrap: str, database_url: str, port: int) -> None:
        super().__init__(
            directory,
            worker_properties(bootstrap, directory),
            connector_properties(database_url, port),
            jvm_options=JVM_OPTIONS,
        )


# --- CPU time from /proc ------------------------------------------------------------------------

_TICKS = os.sysconf("SC_CLK_TCK")


def _stat(pid: int) -> list[str]:
    with open(f"/proc/{pid}/stat") as f:
        # The command name is in parentheses and may hold spaces: split after it.
        return f.read().rsplit(")", 1)[1].split()


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.listdir("/proc"):
        if entry.isdigit():
            with contextlib.suppress(OSError, IndexError):
                if int(_stat(int(entry))[1]) == pid:
                    found.append(int(entry))
    return found


def cpu_seconds(pid: int, *, with_reaped: bool = False) -> float:
    """utime + stime of ``pid`` and its live children so far; with ``with_reaped``, also the
    time of children it already waited for (cutime + cstime)."""
    total = 0
    with contextlib.suppress(OSError):
        fields = _stat(pid)
        total += int(fields[11]) + int(fields[12])  # utime, stime
        if with_reaped:
            total += int(fields[13]) + int(fields[14])  # cutime, cstime
    for child in _children(pid):
        with contextlib.suppress(OSError):
            fields = _stat(child)
            total += int(fields[11]) + int(fields[12])
    return total / _TICKS
