"""``outbox-relay run``: the relay daemon, with one option per setting."""

from __future__ import annotations

from typing import Any

import click
import structlog

from outbox import urls
from outbox_relay.cli.common import handle_errors, location, location_options
from outbox_relay.cli.duration import SYNTAX
from outbox_relay.cli.options import SETTINGS, options, relay_settings
from outbox_relay.kafka import KafkaPublisher, check_kafka_config
from outbox_relay.loop import serve


@click.command("run", epilog=SYNTAX)
@options(*SETTINGS[:2])
@location_options
@options(*SETTINGS[2:])
@handle_errors
def run(schema_name: str, table_prefix: str, **values: Any) -> None:
    """Publish outbox rows to Kafka until SIGTERM or SIGINT.

    Run two or more for availability: they share the shards, and a dead relay's shards are taken
    over within about --rebalance-interval. Events of one key are published in order; a relay
    that dies mid-batch causes duplicates of that batch, never a loss.
    """
    urls.parse(values.get("database_url") or "")
    settings = relay_settings(values, location(schema_name, table_prefix))
    check_kafka_config(settings)
    structlog.contextvars.bind_contextvars(relay_id=settings.relay_id)
    publisher = KafkaPublisher(settings)
    serve(
        settings,
        publisher,
        check_broker=lambda: publisher.check_reachable(settings.connect_timeout),
        probe_broker=publisher.check_reachable,
    )
