"""What every command shares: where the outbox is, the database options, errors and exit codes."""

from __future__ import annotations

import contextlib
import functools
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import psycopg

from outbox import migrator
from outbox.errors import ConfigurationError, SchemaError, one_line
from outbox.settings import OutboxSettings
from outbox_relay import pg
from outbox_relay.cli.options import options
from outbox_relay.exit_codes import ExitCode
from outbox_relay.kafka import BrokerUnavailableError

F = TypeVar("F", bound=Callable[..., Any])

#: ``--database-url`` and ``--connect-timeout``, as the relays take them.
database_options = options("database_url", "connect_timeout")


def fail(message: str, code: ExitCode) -> NoReturn:
    """One actionable message on stderr and a meaningful exit code."""
    click.echo(f"Error: {message}", err=True)
    raise SystemExit(int(code))


def location_options(func: F) -> F:
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


def location(schema_name: str, table_prefix: str) -> OutboxSettings:
    return OutboxSettings(schema=schema_name, table_prefix=table_prefix)


def handle_errors(func: F) -> F:
    """Translate the library's errors into one message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except ConfigurationError as exc:
            fail(str(exc), ExitCode.USAGE)
        except SchemaError as exc:
            fail(str(exc), ExitCode.SCHEMA_NOT_CURRENT)
        except pg.DatabaseUnavailableError as exc:
            fail(str(exc), ExitCode.DATABASE_UNAVAILABLE)
        except BrokerUnavailableError as exc:
            fail(str(exc), ExitCode.BROKER_UNAVAILABLE)
        except psycopg.errors.LockNotAvailable as exc:
            fail(
                f"gave up waiting for a lock ({exc.diag.message_primary}): another `schema apply` "
                "or a long transaction on the outbox tables holds it; retry, or raise "
                "--lock-timeout",
                ExitCode.FAILURE,
            )
        except psycopg.Error as exc:
            fail(f"PostgreSQL refused: {one_line(exc)}", ExitCode.FAILURE)

    return wrapper  # type: ignore[return-value]


@contextlib.contextmanager
def checked_connection(
    database_url: str | None, connect_timeout: float, settings: OutboxSettings
) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a database whose outbox schema is current, outside any transaction."""
    with pg.connect(database_url or "", connect_timeout=connect_timeout) as conn:
        migrator.require_current(conn, settings)
        conn.rollback()
        yield conn
