"""``outbox-relay run``: the relay daemon, with one option per setting."""

from __future__ import annotations

import dataclasses
from typing import Any

import click
import structlog
from click.core import ParameterSource

from outbox import urls
from outbox.errors import ConfigurationError
from outbox_relay import outboxes
from outbox_relay.cli.common import handle_errors, location, location_options, outboxes_option
from outbox_relay.cli.duration import SYNTAX
from outbox_relay.cli.options import SETTINGS, envvar, flag, options, relay_settings
from outbox_relay.config import RelaySettings, option_of
from outbox_relay.fleet import entries_changed, serve_fleet
from outbox_relay.kafka import KafkaPublisher, check_kafka_config
from outbox_relay.loop import serve
from outbox_relay.wakeup import FLEET_IDLE_TICK

_URL = option_of("database_url")


@click.command("run", epilog=SYNTAX)
@click.option(
    flag("database_url"),
    "database_urls",
    envvar=envvar("database_url"),
    show_envvar=True,
    multiple=True,
    help=f"{_URL.help if _URL else ''} Give it once per outbox to serve several (whitespace-"
    "separated in the variable), each at --schema and --table-prefix.",
)
@outboxes_option
@click.option(
    "--fleet-database-url",
    envvar="OUTBOX_FLEET_DATABASE_URL",
    show_envvar=True,
    help="With several outboxes: the database where the fleet's relays find each other to"
    " share the outboxes (no schema needed). [default: the first outbox's database]",
)
@options(SETTINGS[1])
@location_options
@options(*SETTINGS[2:])
@handle_errors
def run(
    schema_name: str,
    table_prefix: str,
    database_urls: tuple[str, ...],
    outboxes_file: str | None,
    fleet_database_url: str | None,
    **values: Any,
) -> None:
    """Publish outbox rows to Kafka until SIGTERM or SIGINT.

    Run two or more for availability: they share the shards, and a dead relay's shards are taken
    over within about --rebalance-interval. Events of one key are published in order; a relay
    that dies mid-batch causes duplicates of that batch, never a loss.

    Several outboxes (--database-url given more than once, or --outboxes): the relays share
    them, each outbox served by its `relays` of them; an outbox that fails (database down,
    schema missing) is retried alone while the others go on.
    """
    if outboxes_file and database_urls:
        raise ConfigurationError(
            "give either --outboxes or --database-url (OUTBOX_OUTBOXES or OUTBOX_DATABASE_URL),"
            " not both"
        )
    if not (outboxes_file or database_urls):
        urls.parse("")  # the message naming both ways to give a URL
    place = location(schema_name, table_prefix)
    file = outboxes.OutboxFile(outboxes_file) if outboxes_file else None
    entries = file.read() if file is not None else outboxes.from_urls(database_urls, place)
    if not entries:
        raise ConfigurationError(
            f"the outbox list {outboxes_file} names no outbox: add an [[outbox]]"
        )
    settings = relay_settings({**values, "database_url": entries[0].database_url}, place)
    check_kafka_config(settings)
    structlog.contextvars.bind_contextvars(relay_id=settings.relay_id)
    probe = KafkaPublisher(settings)
    if file is None and len(entries) == 1:
        (entry,) = entries
        serve(
            entry.settings(settings),
            probe,
            name=entry.name,
            check_broker=lambda: probe.check_reachable(settings.connect_timeout),
            probe_broker=probe.check_reachable,
        )
        return
    if click.get_current_context().get_parameter_source("idle_tick") is ParameterSource.DEFAULT:
        settings = dataclasses.replace(settings, idle_tick=FLEET_IDLE_TICK)
    serve_fleet(
        settings,
        entries_changed(file.read if file is not None else lambda: entries, file),
        fleet_database_url or entries[0].database_url,
        new_publisher=_new_publisher,
        check_broker=lambda: probe.check_reachable(settings.connect_timeout),
        probe_broker=probe.check_reachable,
    )


def _new_publisher(settings: RelaySettings) -> KafkaPublisher:
    return KafkaPublisher(settings)
