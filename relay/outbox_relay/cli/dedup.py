"""``outbox-relay dedup``: maintain the consumers' dedup table."""

from __future__ import annotations

import datetime as dt

import click
import structlog

from outbox import dedup, migrator
from outbox_relay import pg
from outbox_relay.cli.common import database_options, handle_errors, location, location_options
from outbox_relay.cli.duration import SYNTAX, Duration

log = structlog.get_logger("relay.cli")


@click.group("dedup")
def group() -> None:
    """Maintain the consumers' dedup table."""


@group.command("purge", epilog=SYNTAX)
@database_options
@location_options
@click.option(
    "--older-than",
    envvar="OUTBOX_DEDUP_RETENTION",
    show_envvar=True,
    required=True,
    type=Duration(0, min_open=True),
    help="Delete records older than this (7d). Choose it longer than the longest time a "
    "message can be delivered again.",
)
@click.option(
    "--batch-size",
    type=click.IntRange(min=1),
    default=1000,
    show_default=True,
    help="Rows deleted per transaction.",
)
@handle_errors
def purge(
    database_url: str | None,
    connect_timeout: float,
    schema_name: str,
    table_prefix: str,
    older_than: float,
    batch_size: int,
) -> None:
    """Delete dedup records older than --older-than, in small transactions."""
    age = dt.timedelta(seconds=older_than)
    settings = location(schema_name, table_prefix)
    with pg.connect(database_url or "", connect_timeout=connect_timeout, autocommit=True) as conn:
        migrator.require_current(conn, settings)
        deleted = dedup.purge(conn, age, settings=settings, batch_size=batch_size)
    log.info("dedup.purged", rows=deleted, older_than_s=older_than)
    click.echo(f"deleted {deleted} dedup records older than {age}")
