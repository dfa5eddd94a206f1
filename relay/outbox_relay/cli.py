"""The ``outbox-relay`` command: thin wiring of options to the library, and exit codes.

Every option can also be set through the environment variable shown in ``--help``.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import functools
import json
from collections.abc import Callable, Iterator
from typing import Any, NoReturn, TypeVar

import click
import psycopg
import structlog

from outbox import dedup, migrator
from outbox.errors import ConfigurationError, SchemaError, one_line
from outbox.schema import latest_version, script
from outbox.settings import OutboxSettings
from outbox_relay import dead_letters, logs, pg, status
from outbox_relay.config import RelaySettings, default_relay_id, parse_kafka_config
from outbox_relay.exit_codes import ExitCode
from outbox_relay.kafka import BrokerUnavailableError, KafkaPublisher
from outbox_relay.loop import serve

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
        except BrokerUnavailableError as exc:
            _fail(str(exc), ExitCode.BROKER_UNAVAILABLE)
        except psycopg.errors.LockNotAvailable as exc:
            _fail(
                f"gave up waiting for a lock ({exc.diag.message_primary}): another `schema apply` "
                "or a long transaction on the outbox tables holds it; retry, or raise "
                "--lock-timeout",
                ExitCode.FAILURE,
            )
        except psycopg.Error as exc:
            _fail(f"PostgreSQL refused: {one_line(exc)}", ExitCode.FAILURE)

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
    3 schema missing or not current, 4 PostgreSQL unreachable, 5 Kafka unreachable at start,
    6 lag over status --max-lag, 7 nothing matched (dead-letters, replay).
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
    # Not the relays' OUTBOX_LOCK_TIMEOUT: a migration job's environment must not change them.
    envvar="OUTBOX_MIGRATION_LOCK_TIMEOUT",
    show_envvar=True,
    type=click.FloatRange(min=0.1),
    default=60.0,
    show_default=True,
    help="Seconds to wait for locks (another apply, or a busy table) before giving up. The "
    "relays' own lock timeout is OUTBOX_LOCK_TIMEOUT.",
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


def _option(name: str, env: str, help: str, **kwargs: Any) -> Callable[[F], F]:
    """A relay option: always with an environment variable and its default shown."""
    return click.option(name, envvar=env, show_envvar=True, show_default=True, help=help, **kwargs)


_defaults = RelaySettings.__dataclass_fields__


def _default(name: str) -> Any:
    field = _defaults[name]
    return field.default


# Options that `run` and `status` share: `status` must read the relays' values as they do.
_on_dead_letter_option = _option(
    "--on-dead-letter",
    "OUTBOX_ON_DEAD_LETTER",
    "After a row of a key is dead-lettered: later rows of the key proceed, or stay blocked "
    "until an operator acts. Give `status` the relays' value.",
    type=click.Choice(["proceed", "block"]),
    default="proceed",
)
_retention_option = _option(
    "--retention",
    "OUTBOX_RETENTION",
    "Seconds to keep published rows (purged in small batches); 0 deletes on publish. Give "
    "`status` the relays' value: above 0, it counts the events published in the last minute.",
    type=click.FloatRange(min=0),
    default=_default("retention"),
)


@cli.command("run")
@_database_options
@_option(
    "--kafka-bootstrap-servers", "OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "Kafka brokers, host:port[,...]."
)
@_option(
    "--kafka-config",
    "OUTBOX_KAFKA_CONFIG",
    "Extra librdkafka producer setting, key=value (repeatable; whitespace-separated in the "
    "variable), e.g. security.protocol=SASL_SSL. Idempotence and acks=all cannot be turned off.",
    multiple=True,
)
@_location_options
@_option("--relay-id", "OUTBOX_RELAY_ID", "Name of this relay in logs [default: host-pid-random].")
@_option(
    "--batch-size",
    "OUTBOX_BATCH_SIZE",
    "Rows per batch (one transaction, one flush).",
    type=click.IntRange(min=1),
    default=_default("batch_size"),
)
@_option(
    "--batch-max-bytes",
    "OUTBOX_BATCH_MAX_BYTES",
    "Payload bytes per batch at most (the oldest row always fits); bounds memory.",
    type=click.IntRange(min=1),
    default=_default("batch_max_bytes"),
)
@_option(
    "--poll-interval",
    "OUTBOX_POLL_INTERVAL",
    "Seconds an idle relay waits at most before it claims anyway (new events wake it sooner; "
    "a retry falling due does not).",
    type=click.FloatRange(min=0.01),
    default=_default("poll_interval"),
)
@_option(
    "--backoff-base",
    "OUTBOX_BACKOFF_BASE",
    "Retry delay of a failed row: random(0, min(cap, base * 2**attempt)) seconds.",
    type=click.FloatRange(min=0.001),
    default=_default("backoff_base"),
)
@_option(
    "--backoff-cap",
    "OUTBOX_BACKOFF_CAP",
    "Longest retry delay of a failed row, seconds.",
    type=click.FloatRange(min=0.001),
    default=_default("backoff_cap"),
)
@_option(
    "--max-attempts",
    "OUTBOX_MAX_ATTEMPTS",
    "Failed deliveries before a row is dead-lettered.",
    type=click.IntRange(min=1),
    default=_default("max_attempts"),
)
@_on_dead_letter_option
@_option(
    "--rebalance-interval",
    "OUTBOX_REBALANCE_INTERVAL",
    "Seconds between shard rebalances; bounds the takeover of a dead relay's shards.",
    type=click.FloatRange(min=0.05),
    default=_default("rebalance_interval"),
)
@_retention_option
@_option(
    "--statement-timeout",
    "OUTBOX_STATEMENT_TIMEOUT",
    "PostgreSQL statement_timeout of the relay's sessions, seconds.",
    type=click.FloatRange(min=0.1),
    default=_default("statement_timeout"),
)
@_option(
    "--lock-timeout",
    "OUTBOX_LOCK_TIMEOUT",
    "PostgreSQL lock_timeout of the relay's sessions, seconds. Not `schema apply`'s lock wait "
    "(OUTBOX_MIGRATION_LOCK_TIMEOUT).",
    type=click.FloatRange(min=0.1),
    default=_default("lock_timeout"),
)
@_option(
    "--delivery-timeout",
    "OUTBOX_DELIVERY_TIMEOUT",
    "Bound on one message's delivery (librdkafka message.timeout.ms), seconds.",
    type=click.FloatRange(min=0.1),
    default=_default("delivery_timeout"),
)
@_option(
    "--grace-period",
    "OUTBOX_GRACE_PERIOD",
    "Seconds to finish the in-flight batch after SIGTERM/SIGINT.",
    type=click.FloatRange(min=0),
    default=_default("grace_period"),
)
@_option(
    "--breaker-threshold",
    "OUTBOX_BREAKER_THRESHOLD",
    "Consecutive failed batches that stop claiming (circuit breaker).",
    type=click.IntRange(min=1),
    default=_default("breaker_threshold"),
)
@_option(
    "--breaker-cooldown",
    "OUTBOX_BREAKER_COOLDOWN",
    "Seconds before a small probe batch once the breaker opened (grows with jitter).",
    type=click.FloatRange(min=0.01),
    default=_default("breaker_cooldown"),
)
@_option(
    "--breaker-max-cooldown",
    "OUTBOX_BREAKER_MAX_COOLDOWN",
    "Longest wait between probe batches while the breaker stays open, seconds.",
    type=click.FloatRange(min=0.01),
    default=_default("breaker_max_cooldown"),
)
@_option(
    "--probe-size",
    "OUTBOX_PROBE_SIZE",
    "Rows in a probe batch.",
    type=click.IntRange(min=1),
    default=_default("probe_size"),
)
@_option(
    "--prefetch/--no-prefetch",
    "OUTBOX_PREFETCH",
    "Claim the next batch on a second connection while the current one is published.",
    default=_default("prefetch"),
)
@_option(
    "--synchronous-commit/--no-synchronous-commit",
    "OUTBOX_SYNCHRONOUS_COMMIT",
    "Make the relay's own commits (rows marked published) wait for the disk. Off: a database "
    "crash can undo its last commits, and those rows are sent again (duplicates, never a loss).",
    default=_default("synchronous_commit"),
)
@_option(
    "--exit-when-idle",
    "OUTBOX_EXIT_WHEN_IDLE",
    "Exit 0 once no deliverable row is left (for scripts and tests), after logging "
    "relay.drained: rows published and seconds from the first claim to the last commit.",
    is_flag=True,
)
@_option(
    "--metrics-port",
    "OUTBOX_METRICS_PORT",
    "Serve Prometheus /metrics and the /healthz and /readyz probes on this port "
    "[default: not served].",
    type=click.IntRange(min=1, max=65535),
    default=_default("metrics_port"),
)
@_option(
    "--metrics-host",
    "OUTBOX_METRICS_HOST",
    "Address the metrics server listens on.",
    default=_default("metrics_host"),
)
@_handle_errors
def run(
    database_url: str | None,
    connect_timeout: float,
    kafka_bootstrap_servers: str | None,
    kafka_config: tuple[str, ...],
    schema_name: str,
    table_prefix: str,
    relay_id: str | None,
    on_dead_letter: str,
    **tuning: Any,
) -> None:
    """Publish outbox rows to Kafka until SIGTERM or SIGINT.

    Run two or more for availability: they share the shards, and a dead relay's shards are taken
    over within about --rebalance-interval. Events of one key are published in order; a relay
    that dies mid-batch causes duplicates of that batch, never a loss.
    """
    from outbox import urls

    urls.parse(database_url or "")
    settings = RelaySettings(
        database_url=database_url or "",
        kafka_bootstrap_servers=kafka_bootstrap_servers or "",
        kafka_config=parse_kafka_config(kafka_config),
        outbox=_settings(schema_name, table_prefix),
        connect_timeout=connect_timeout,
        dead_letter_blocks_key=on_dead_letter == "block",
        relay_id=relay_id or default_relay_id(),
        **tuning,
    )
    structlog.contextvars.bind_contextvars(relay_id=settings.relay_id)
    publisher = KafkaPublisher(settings)
    serve(
        settings,
        publisher,
        check_broker=lambda: publisher.check_reachable(connect_timeout),
        probe_broker=publisher.check_reachable,
    )


_DURATION_UNITS = {"s": 1, "m": 60, "h": 3600, "d": 86400}


def _duration(text: str) -> dt.timedelta:
    """``90``, ``90s``, ``15m``, ``12h`` or ``7d``."""
    value, unit = (text[:-1], text[-1]) if text and text[-1] in _DURATION_UNITS else (text, "s")
    try:
        seconds = float(value) * _DURATION_UNITS[unit]
    except ValueError:
        raise click.BadParameter(f"{text!r} is not a duration like 90s, 15m, 12h or 7d") from None
    if seconds <= 0:
        raise click.BadParameter("must be positive")
    return dt.timedelta(seconds=seconds)


@cli.group("dedup")
def dedup_group() -> None:
    """Maintain the consumers' dedup table."""


@dedup_group.command("purge")
@_database_options
@_location_options
@click.option(
    "--older-than",
    envvar="OUTBOX_DEDUP_RETENTION",
    show_envvar=True,
    required=True,
    callback=lambda _ctx, _param, value: _duration(value),
    help="Delete records older than this (90s, 15m, 12h, 7d). Choose it longer than the "
    "longest time a message can be delivered again.",
)
@click.option("--batch-size", type=click.IntRange(min=1), default=1000, show_default=True,
              help="Rows deleted per transaction.")  # fmt: skip
@_handle_errors
def dedup_purge(
    database_url: str | None,
    connect_timeout: float,
    schema_name: str,
    table_prefix: str,
    older_than: dt.timedelta,
    batch_size: int,
) -> None:
    """Delete dedup records older than --older-than, in small transactions."""
    settings = _settings(schema_name, table_prefix)
    with pg.connect(database_url or "", connect_timeout=connect_timeout, autocommit=True) as conn:
        migrator.require_current(conn, settings)
        deleted = dedup.purge(conn, older_than, settings=settings, batch_size=batch_size)
    log.info("dedup.purged", rows=deleted, older_than_s=older_than.total_seconds())
    click.echo(f"deleted {deleted} dedup records older than {older_than}")


@contextlib.contextmanager
def _checked_connection(
    database_url: str | None, connect_timeout: float, settings: OutboxSettings
) -> Iterator[psycopg.Connection[Any]]:
    """A connection to a database whose outbox schema is current, outside any transaction."""
    with pg.connect(database_url or "", connect_timeout=connect_timeout) as conn:
        migrator.require_current(conn, settings)
        conn.rollback()
        yield conn


def _when(text: str | None) -> dt.datetime | None:
    """An ISO 8601 time (UTC when it has no offset), or a duration ago: 15m, 12h, 7d."""
    if text is None:
        return None
    try:
        return dt.datetime.now(dt.UTC) - _duration(text)
    except click.BadParameter:
        pass
    try:
        parsed = dt.datetime.fromisoformat(text)
    except ValueError:
        raise click.BadParameter(
            f"{text!r} is neither an ISO time nor a duration like 12h"
        ) from None
    return parsed if parsed.tzinfo else parsed.replace(tzinfo=dt.UTC)


@cli.command("status")
@_database_options
@_location_options
@_on_dead_letter_option
@_retention_option
@click.option("--json", "as_json", is_flag=True, help="One JSON object, for scripts.")
@click.option(
    "--max-lag",
    type=click.FloatRange(min=0),
    default=None,
    help="Exit 6 when the oldest unpublished event is older than this many seconds.",
)
@_handle_errors
def status_command(
    database_url: str | None,
    connect_timeout: float,
    schema_name: str,
    table_prefix: str,
    on_dead_letter: str,
    retention: float,
    as_json: bool,
    max_lag: float | None,
) -> None:
    """Backlog, lag, retries, dead letters, blocked keys, and the live relays with their shards."""
    settings = _settings(schema_name, table_prefix)
    with _checked_connection(database_url, connect_timeout, settings) as conn:
        found = status.read(
            conn, settings, dead_letters_block=on_dead_letter == "block",
            retention_kept=retention > 0,
        )  # fmt: skip
    click.echo(json.dumps(found.as_json(), indent=2) if as_json else status.render(found))
    lag = found.oldest_unpublished_seconds
    if max_lag is not None and lag is not None and lag > max_lag:
        _fail(f"the oldest unpublished event is {lag:.0f} s old (--max-lag {max_lag:g})",
              ExitCode.LAGGING)  # fmt: skip


@cli.group("dead-letters")
def dead_letters_group() -> None:
    """List, retry and discard events the relay gave up on."""


def _selection_options(func: F) -> F:
    for option in (
        click.option("--id", "ids", type=int, multiple=True, help="Row id (repeatable)."),
        click.option("--topic", help="Only this topic."),
        click.option("--key", help="Only this key (UTF-8)."),
        click.option("--since", help="Dead-lettered at or after: ISO time or 15m/12h/7d ago."),
        click.option("--until", help="Dead-lettered before: ISO time or 15m/12h/7d ago."),
    ):
        func = option(func)
    return func


def _actor_option(func: F) -> F:
    return click.option("--actor", envvar="OUTBOX_ACTOR", show_envvar=True,
                        default=dead_letters.default_actor, show_default="user@host",
                        help="Who is acting, for the log.")(func)  # fmt: skip


@dead_letters_group.command("list")
@_database_options
@_location_options
@_selection_options
@click.option("--limit", type=click.IntRange(min=1), default=100, show_default=True)
@click.option("--history", is_flag=True, help="Show the log of retries and discards instead.")
@click.option("--json", "as_json", is_flag=True, help="JSON lines, for scripts.")
@_handle_errors
def dead_letters_list(
    database_url: str | None, connect_timeout: float, schema_name: str, table_prefix: str,
    ids: tuple[int, ...], topic: str | None, key: str | None, since: str | None,
    until: str | None, limit: int, history: bool, as_json: bool,
) -> None:  # fmt: skip
    """Dead-lettered events with their error and attempts (or, with --history, the log)."""
    settings = _settings(schema_name, table_prefix)
    with _checked_connection(database_url, connect_timeout, settings) as conn:
        if history:
            for entry in dead_letters.history(conn, settings, limit):
                click.echo(json.dumps(entry, default=str) if as_json else
                           "{at:%Y-%m-%d %H:%M:%S} {action:8} row {row_id} {topic} by {actor}: "
                           "{reason}".format(**entry))  # fmt: skip
            return
        selection = dead_letters.Selection(ids, topic, key, _when(since), _when(until))
        rows = dead_letters.list_dead_letters(conn, settings, selection, limit)
    for row in rows:
        if as_json:
            click.echo(json.dumps(dataclasses.asdict(row), default=str))
        else:
            click.echo(f"{row.id:>10} {row.dead_lettered_at:%Y-%m-%d %H:%M:%S} {row.topic} "
                       f"key={row.key!r} attempts={row.attempts} {row.event_id}\n"
                       f"{'':>10} {row.last_error}")  # fmt: skip
    if not rows and not as_json:
        click.echo("no dead letters")


@dead_letters_group.command("retry")
@_database_options
@_location_options
@_selection_options
@click.option("--all", "everything", is_flag=True, help="Every dead letter.")
@click.option("--reason", help="Why, for the log.")
@_actor_option
@_handle_errors
def dead_letters_retry(
    database_url: str | None, connect_timeout: float, schema_name: str, table_prefix: str,
    ids: tuple[int, ...], topic: str | None, key: str | None, since: str | None,
    until: str | None, everything: bool, reason: str | None, actor: str,
) -> None:  # fmt: skip
    """Send dead letters again (attempts reset, same event_id). Select by --id, --topic, --key,
    time, or --all."""
    selection = dead_letters.Selection(ids, topic, key, _when(since), _when(until))
    if not everything and selection == dead_letters.Selection():
        raise click.UsageError(
            "choose what to retry: --id, --topic, --key, --since/--until or --all"
        )
    settings = _settings(schema_name, table_prefix)
    with _checked_connection(database_url, connect_timeout, settings) as conn:
        retried = dead_letters.retry(conn, settings, selection, actor=actor, reason=reason)
    if not retried:
        _fail("no dead letter matched", ExitCode.NOTHING_MATCHED)
    click.echo(f"retrying {len(retried)} event(s): rows {_ids(retried)}")


@dead_letters_group.command("discard")
@_database_options
@_location_options
@click.option("--id", "ids", type=int, multiple=True, required=True, help="Row id (repeatable).")
@click.option("--reason", required=True, help="Why the event is dropped (recorded).")
@_actor_option
@_handle_errors
def dead_letters_discard(
    database_url: str | None, connect_timeout: float, schema_name: str, table_prefix: str,
    ids: tuple[int, ...], reason: str, actor: str,
) -> None:  # fmt: skip
    """Delete dead letters for good; the log keeps what they were, who and why."""
    if not reason.strip():
        raise click.BadParameter("a reason is required", param_hint="--reason")
    settings = _settings(schema_name, table_prefix)
    with _checked_connection(database_url, connect_timeout, settings) as conn:
        discarded = dead_letters.discard(conn, settings, ids, reason=reason, actor=actor)
    if not discarded:
        _fail("no dead letter matched", ExitCode.NOTHING_MATCHED)
    click.echo(f"discarded {len(discarded)} event(s): rows {_ids(discarded)}")


def _ids(ids: list[int]) -> str:
    return ", ".join(map(str, ids[:20])) + (f" and {len(ids) - 20} more" if len(ids) > 20 else "")


@cli.command("replay")
@_database_options
@_location_options
@click.option("--from-id", type=int, help="First row id of the range.")
@click.option("--to-id", type=int, help="Last row id of the range (inclusive).")
@click.option("--since", help="Created at or after: ISO time or 15m/12h/7d ago.")
@click.option("--until", help="Created before: ISO time or 15m/12h/7d ago.")
@click.option("--topic", help="Only this topic.")
@_handle_errors
def replay_command(
    database_url: str | None, connect_timeout: float, schema_name: str, table_prefix: str,
    from_id: int | None, to_id: int | None, since: str | None, until: str | None,
    topic: str | None,
) -> None:  # fmt: skip
    """Publish already-published events again, with their original event_id.

    Needs the relays to keep published rows (--retention); consumers' dedup recognises the
    events they already processed.
    """
    if from_id is None and to_id is None and since is None and until is None:
        raise click.UsageError("choose a range: --from-id/--to-id or --since/--until")
    selection = dead_letters.Selection(topic=topic, since=_when(since), until=_when(until),
                                       from_id=from_id, to_id=to_id)  # fmt: skip
    settings = _settings(schema_name, table_prefix)
    with _checked_connection(database_url, connect_timeout, settings) as conn:
        replayed = dead_letters.replay(conn, settings, selection)
    if not replayed:
        _fail(
            "no published event in that range is retained: the relay deletes rows once they "
            "are published unless it runs with --retention (OUTBOX_RETENTION) long enough",
            ExitCode.NOTHING_MATCHED,
        )
    click.echo(f"replaying {len(replayed)} event(s): rows {_ids(replayed)}")


def main() -> None:
    """Console-script entry point."""
    cli(prog_name="outbox-relay")
