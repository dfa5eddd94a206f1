"""``outbox-relay schema``: show, apply and check the versioned SQL migrations."""

from __future__ import annotations

import click
import structlog

from outbox import migrator
from outbox.schema import latest_version, script
from outbox_relay import pg
from outbox_relay.cli.common import database_options, handle_errors, location, location_options
from outbox_relay.cli.duration import SYNTAX, Duration

log = structlog.get_logger("relay.cli")


@click.group("schema")
def group() -> None:
    """Install, inspect and check the outbox tables (versioned SQL migrations)."""


@group.command("show")
@location_options
@handle_errors
def show(schema_name: str, table_prefix: str) -> None:
    """Print the full schema SQL without connecting to a database.

    The script runs in one transaction and records the migrations like `schema apply` does,
    so you can pipe it into psql or paste it into Alembic or Flyway:

        outbox-relay schema show | psql "$DATABASE_URL"
    """
    click.echo(script(location(schema_name, table_prefix)), nl=False)


@group.command("apply", epilog=SYNTAX)
@database_options
@location_options
@click.option(
    "--lock-timeout",
    # Not the relays' OUTBOX_LOCK_TIMEOUT: a migration job's environment must not change them.
    envvar="OUTBOX_MIGRATION_LOCK_TIMEOUT",
    show_envvar=True,
    type=Duration(0.1),
    default="60s",
    show_default=True,
    help="How long to wait for locks (another apply, or a busy table) before giving up. The "
    "relays' own lock timeout is OUTBOX_LOCK_TIMEOUT.",
)
@handle_errors
def apply(
    database_url: str | None,
    connect_timeout: float,
    schema_name: str,
    table_prefix: str,
    lock_timeout: float,
) -> None:
    """Apply pending migrations, all in one transaction. Running it again changes nothing."""
    settings = location(schema_name, table_prefix)
    with pg.connect(database_url or "", connect_timeout=connect_timeout) as conn:
        applied = migrator.apply(conn, settings, lock_timeout_ms=round(lock_timeout * 1000))
    for migration in applied:
        log.info("schema.migration_applied", migration=migration.label, schema=settings.schema)
    if not applied:
        click.echo(f"schema is up to date (version {latest_version()}); nothing applied")
        return
    labels = ", ".join(m.label for m in applied)
    click.echo(f"applied {labels}; schema is at version {latest_version()}")


@group.command("check", epilog=SYNTAX)
@database_options
@location_options
@handle_errors
def check(
    database_url: str | None, connect_timeout: float, schema_name: str, table_prefix: str
) -> None:
    """Exit 0 if every migration is applied; else exit 3 and say what is missing."""
    settings = location(schema_name, table_prefix)
    with pg.connect(database_url or "", connect_timeout=connect_timeout) as conn:
        migrator.require_current(conn, settings)
    click.echo(f"schema is current (version {latest_version()})")
