"""What every command shares: where the outbox is, the database options, errors and exit codes."""

from __future__ import annotations

import contextlib
import dataclasses
import functools
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import psycopg
from click.core import ParameterSource

from outbox import migrator, urls
from outbox.errors import ConfigurationError, SchemaError, one_line
from outbox.settings import OutboxSettings
from outbox_relay import pg
from outbox_relay.cli.options import options
from outbox_relay.exit_codes import ExitCode
from outbox_relay.kafka import BrokerUnavailableError
from outbox_relay.outboxes import OutboxEntry, OutboxFile, find, from_urls

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


def explain(exc: Exception) -> tuple[str, ExitCode] | None:
    """The one-line message and exit code of an error the commands expect; None for others."""
    if isinstance(exc, ConfigurationError):
        return str(exc), ExitCode.USAGE
    if isinstance(exc, SchemaError):
        return str(exc), ExitCode.SCHEMA_NOT_CURRENT
    if isinstance(exc, pg.DatabaseUnavailableError):
        return str(exc), ExitCode.DATABASE_UNAVAILABLE
    if isinstance(exc, BrokerUnavailableError):
        return str(exc), ExitCode.BROKER_UNAVAILABLE
    if isinstance(exc, psycopg.errors.LockNotAvailable):
        return (
            f"gave up waiting for a lock ({exc.diag.message_primary}): another `schema apply` "
            "or a long transaction on the outbox tables holds it; retry, or raise "
            "--lock-timeout",
            ExitCode.FAILURE,
        )
    if isinstance(exc, psycopg.Error):
        return f"PostgreSQL refused: {one_line(exc)}", ExitCode.FAILURE
    return None


def handle_errors(func: F) -> F:
    """Translate the library's errors into one message and an exit code."""

    @functools.wraps(func)
    def wrapper(*args: Any, **kwargs: Any) -> Any:
        try:
            return func(*args, **kwargs)
        except Exception as exc:
            explained = explain(exc)
            if explained is None:
                raise
            fail(*explained)

    return wrapper  # type: ignore[return-value]


def outboxes_option(func: F) -> F:
    """``--outboxes FILE``: the list of outboxes the relays serve."""
    return click.option(
        "--outboxes",
        "outboxes_file",
        envvar="OUTBOX_OUTBOXES",
        show_envvar=True,
        type=click.Path(dir_okay=False),
        help="A TOML list of outboxes, instead of --database-url, --schema and --table-prefix:"
        " an [[outbox]] table each, with its name, database_url, and optionally schema,"
        " table_prefix, relays (how many relays serve it, default 1) and retention. `run`"
        " reads it again when it changes: outboxes come and go without a restart.",
    )(func)


def outbox_option(func: F) -> F:
    """``--outbox NAME``: one outbox of the ``--outboxes`` list."""
    return click.option(
        "--outbox",
        "outbox_name",
        envvar="OUTBOX_OUTBOX_NAME",
        show_envvar=True,
        metavar="NAME",
        help="The outbox of the --outboxes list to act on, by its name.",
    )(func)


@dataclasses.dataclass(frozen=True, slots=True)
class Where:
    """Where the outbox is, as the options say: ``--database-url`` at ``--schema`` and
    ``--table-prefix``, or the ``--outboxes`` list and perhaps one ``--outbox`` of it."""

    database_url: str | None = None
    schema_name: str = OutboxSettings().schema
    table_prefix: str = OutboxSettings().table_prefix
    outboxes_file: str | None = None
    outbox_name: str | None = None

    @property
    def every_listed(self) -> bool:
        """Whether the options name every outbox of a list (``--outboxes`` without ``--outbox``)."""
        return self.outboxes_file is not None and self.outbox_name is None

    def outboxes(self) -> tuple[OutboxEntry, ...]:
        """``--database-url``'s outbox, the ``--outbox`` of the list, or, with ``--outboxes``
        alone, every outbox of the list. A wrong combination is a usage error (exit 2)."""
        if self.outboxes_file is None:
            if self.outbox_name is not None:
                raise click.UsageError(
                    f"--outbox {self.outbox_name} names an outbox of an --outboxes list: pass"
                    " --outboxes FILE too"
                )
            return (
                _one_outbox(self.database_url or "", location(self.schema_name, self.table_prefix)),
            )
        if self.database_url is not None:
            raise click.UsageError(
                "give either --outboxes (a list of outboxes) or --database-url (one outbox), not"
                " both (check OUTBOX_OUTBOXES and OUTBOX_DATABASE_URL too)"
            )
        _refuse_location_with_a_list()
        entries = OutboxFile(self.outboxes_file).read()
        if self.outbox_name is None:
            return entries
        return (find(entries, self.outbox_name),)

    def outbox(self) -> OutboxEntry:
        """The one outbox a command acts on: with ``--outboxes``, ``--outbox NAME`` is needed."""
        entries = self.outboxes()
        if self.every_listed:
            names = ", ".join(e.name for e in entries) or "no outbox"
            raise click.UsageError(f"pass --outbox NAME (the list has: {names})")
        (entry,) = entries
        return entry


def _one_outbox(database_url: str, settings: OutboxSettings) -> OutboxEntry:
    """``--database-url``'s outbox, named as ``run`` names it; a database whose name cannot name
    an outbox (``run`` refuses it) keeps its own, as these commands only show it."""
    try:
        (entry,) = from_urls([database_url], settings)
    except ConfigurationError:
        database = urls.parse(database_url).database  # a wrong URL still says what is wrong
        return OutboxEntry(database or "outbox", database_url, settings)
    return entry


def _refuse_location_with_a_list() -> None:
    """--schema or --table-prefix on the command line beside --outboxes: the list says those."""
    ctx = click.get_current_context(silent=True)
    given = [
        flag
        for name, flag in (("schema_name", "--schema"), ("table_prefix", "--table-prefix"))
        if ctx is not None and ctx.get_parameter_source(name) is ParameterSource.COMMANDLINE
    ]
    if given:
        raise click.UsageError(
            f"{' and '.join(given)} cannot be used with --outboxes: the list gives each outbox"
            " its schema and table_prefix"
        )


def where_options(func: Callable[..., Any]) -> Callable[..., Any]:
    """``--database-url``, ``--connect-timeout``, ``--schema``, ``--table-prefix``,
    ``--outboxes`` and ``--outbox``; the command gets the outbox options as ``where``."""

    @functools.wraps(func)
    def wrapper(
        *,
        database_url: str | None,
        schema_name: str,
        table_prefix: str,
        outboxes_file: str | None,
        outbox_name: str | None,
        **kwargs: Any,
    ) -> Any:
        where = Where(database_url, schema_name, table_prefix, outboxes_file, outbox_name)
        return func(where=where, **kwargs)

    return database_options(location_options(outboxes_option(outbox_option(wrapper))))


@contextlib.contextmanager
def checked_connection(
    database_url: str | None, connect_timeout: float, settings: OutboxSettings
) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a database whose outbox schema is current, outside any transaction."""
    with pg.connect(database_url or "", connect_timeout=connect_timeout) as conn:
        migrator.require_current(conn, settings)
        conn.rollback()
        yield conn
