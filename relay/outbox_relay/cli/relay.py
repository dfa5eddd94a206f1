"""``outbox-relay run``: the relay daemon, with one option per setting."""

from __future__ import annotations

import logging
from collections.abc import Mapping
from typing import Any

import click
import structlog
from confluent_kafka import KafkaException, Producer

from outbox import urls
from outbox.errors import ConfigurationError
from outbox_relay.cli.common import handle_errors, location, location_options
from outbox_relay.cli.duration import SYNTAX
from outbox_relay.cli.options import SETTINGS, options, relay_settings
from outbox_relay.config import RelaySettings
from outbox_relay.kafka import KafkaPublisher, producer_config
from outbox_relay.loop import serve

#: The throwaway producer's logger: its lines wait for a poll() that never comes.
_UNHEARD = logging.getLogger("outbox_relay.cli.kafka_config_check")


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


def check_kafka_config(settings: RelaySettings) -> None:
    """ConfigurationError, before anything connects, if librdkafka refuses the producer's
    settings: one line naming the --kafka-config property (a misspelt name, a bad value)."""
    config = producer_config(settings)
    del config["bootstrap.servers"]  # a producer without brokers connects to nothing
    why = _refusal(config)
    if why is None:
        return
    # librdkafka may name an alias by its canonical name (linger.ms: queue.buffering.max.ms);
    # the property given that is refused alone, for the same reason, is the one to name.
    named = next((k for k, v in settings.kafka_config.items() if _refusal({k: v}) == why), None)
    # The value is left out: it may be a password.
    what = f"--kafka-config {named} is" if named else "the --kafka-config settings are"
    raise ConfigurationError(f"{what} refused by the Kafka client: {' '.join(why.split())}")


def _refusal(config: Mapping[str, Any]) -> str | None:
    """Why librdkafka refuses to make a producer of ``config`` (None: it does not)."""
    try:
        Producer({**config, "logger": _UNHEARD})
    except KafkaException as exc:
        return str(exc.args[0].str())
    except (TypeError, ValueError, AttributeError) as exc:
        # confluent-kafka's own properties (callbacks, default.topic.config).
        return f"it takes a Python object there, not text ({exc})"
    return None
