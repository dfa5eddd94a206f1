"""The ``outbox-relay`` command: thin wiring of options to the library, and exit codes.

Every option can also be set through the environment variable shown in ``--help``.
"""

from __future__ import annotations

import functools
from collections.abc import Callable
from typing import Any, NoReturn, TypeVar

import click
import psycopg
import structlog

from outbox.errors import ConfigurationError, SchemaError
from outbox.settings import OutboxSettings
from relay import logs, pg
from relay.exit_codes import ExitCode
from schema import latest_version, migrator, script

F = TypeVar("F", bound=Callable[..., Any])
log = structlog.get_logger("relay.cli")


def _fail(message: str, code: ExitCode) -> NoReturn:
    """One actionable message on stderr and a meaningful exit code."""
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(int(code))


def _location_options(func: F) -> F:
    """``--schema`` and ``--table-prefix``: where the outbox tables live."""
    defaults = OutboxSettings()
    func = click.option(
        "--table-prefix",
        envvar="OUTBOX_TABLE_PREFIX",
        show_envvar=True,
        default=defaults.table_prefix,
        show_default=True,
        help="Prefix of every outbox table, index and function name.",
    )(func)
    return click.option(
        "--schema",
        "schema_name",
        envvar="OUTBOX_SCHEMA",
        show_envvar=True,
        default=defaults.schema,
        show_default=True,
        help="PostgreSQL schema (namespace) holding the outbox tables.",
    )(func)


def _database_options(func: F) -> F:
    """``--database-url`` and ``--connect-timeout``."""
    func = click.option(
        "--connect-timeout",
        envvar="OUTBOX_CONNECT_TIMEOUT",
        show_envvar=True,
        type=click.FloatRange(min=1),
        default=10.0,
        show_default=True,
        help="Seconds to wait for PostgreSQL to accept the connection.",
    )(func)
    return click.option(
        "--database-url",
        envvar="OUTBOX_DATABASE_URL",
        show_envvar=True,
        help="PostgreSQL URL: postgresql://user:pass@host:5432/db (libpq) or "
        "postgresql+psycopg://... (SQLAlchemy).",
    )(func)


def _handle_errors(func: F) -> F:
    """Translate the library's errors into one message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigurationError as exc:
            _fail(str(exc), ExitCode.USAGE)
        except SchemaError as exc:
            _fail(str(exc), ExitCode.SCHEMA_NOT_CURRENT)
        except pg.DatabaseUnavailableError as exc:
            _fail(str(exc), ExitCode.DATABASE_UNAVAILABLE)
        except psycopg.errors.LockNotAvailable as exc:
            _fail(
                f"gave up waiting for a lock ({exc.diag.message_primary}): another `schema apply` "
                "or a long transaction on the outbox tables holds it; retry, or raise "
                "--lock-timeout",
                ExitCode.FAILURE,
            )
        except psycopg.Error as exc:
            _fail(f"PostgreSQL refused: {' '.join(str(exc).split())}", ExitCode.FAILURE)

    return wrapper  # type: ignore[return-value]


def _settings(schema_name: str, table_prefix: str) -> OutboxSettings:
    return OutboxSettings(schema=schema_name, table_prefix=table_prefix)


@click.group(context_settings={"help_option_names": ["-h", "--help"], "max_content_width": 100})
@click.option(
    "--log-format",
    envvar="OUTBOX_LOG_FORMAT",
    show_envvar=True,
    type=click.Choice(logs.LOG_FORMATS),
    default="auto",
    show_default=True,
    help="Log lines as JSON, as pretty console output, or auto: pretty on a terminal only.",
)
@click.option(
    "--log-level",
    envvar="OUTBOX_LOG_LEVEL",
    show_envvar=True,
    type=click.Choice(["DEBUG", "INFO", "WARNING", "ERROR"], case_sensitive=False),
    default="INFO",
    show_default=True,
    help="Lowest level of log lines to write.",
)
@click.version_option(package_name="outbox-relay")
def cli(log_format: logs.LogFormat, log_level: str) -> None:
    """outbox-relay: the transactional outbox for PostgreSQL and Kafka.

    Applications write events with outbox.add() inside their own transactions; this command
    manages the outbox schema and runs the relay that publishes the events to Kafka.

    \b
    Exit codes: 0 ok, 1 unexpected error, 2 bad arguments or settings,
    3 schema missing or not current, 4 PostgreSQL unreachable.
    """
    logs.configure(log_format, log_level)


@cli.group("schema")
def schema_group() -> None:
    """Install, inspect and check the outbox tables (versioned SQL migrations)."""


@schema_group.command("show")
@_location_options
@_handle_errors
def schema_show(schema_name: str, table_prefix: str) -> None:
    """Print the full schema SQL without connecting to a database.

    The script runs in one transaction and records the migrations like `schema apply` does,
    so you can pipe it into psql or paste it into Alembic or Flyway:

        outbox-relay schema show | psql "$DATABASE_URL"
    """
    click.echo(script(_settings(schema_name, table_prefix)), nl=False)


@schema_group.command("apply")
@_database_options
@_location_options
@click.option(
    "--lock-timeout",
    envvar="OUTBOX_LOCK_TIMEOUT",
    show_envvar=True,
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for locks (another apply, or a busy table) before giving up.",
)
@_handle_errors
def schema_apply(
    database_url: str | None,
    connect_timeout: float,
    schema_name: str,
    table_prefix: str,
    lock_timeout: float,
) -> None:
    """Apply pending migrations, all in one transaction. Running it again changes nothing."""
    settings = _settings(schema_name, table_prefix)
    with pg.connect(database_url or "", connect_timeout=connect_timeout) as conn:
        applied = migrator.apply(conn, settings, lock_timeout_ms=round(lock_timeout * 1000))
    for migration in applied:
        log.info("schema.migration_applied", migration=migration.label, schema=settings.schema)
    if applied:
        click.echo(f"applied {', '.join(m.label for m in applied)}; schema is at version "
                   f"{latest_version()}")  # fmt: skip
    else:
        click.echo(f"schema is up to date (version {latest_version()}); nothing applied")


@schema_group.command("check")
@_database_options
@_location_options
@_handle_errors
def schema_check(
    database_url: str | None, connect_timeout: float, schema_name: str, table_prefix: str
) -> None:
    """Exit 0 if every migration is applied; else exit 3 and say what is missing."""
    settings = _settings(schema_name, table_prefix)
    with pg.connect(database_url or "", connect_timeout=connect_timeout) as conn:
        migrator.require_current(conn, settings)
    click.echo(f"schema is current (version {latest_version()})")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="outbox-relay")
