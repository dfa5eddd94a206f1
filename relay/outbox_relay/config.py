"""The relay's settings: one frozen object, validated once, shared by every part of the daemon.

Each setting carries its :class:`Option` (help and bounds) beside it; ``outbox-relay run``
generates its options from them, so a setting is described in this file only. A float setting
is a length of time in seconds; the command line takes it as a duration (``90``, ``15m``, ``7d``).
"""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Callable, Mapping
from dataclasses import MISSING, dataclass, field, fields
from types import MappingProxyType
from typing import Any

from outbox.errors import ConfigurationError
from outbox.settings import OutboxSettings

#: librdkafka settings the relay's guarantees depend on; they cannot be overridden.
GUARANTEED_KAFKA_SETTINGS: Mapping[str, str] = MappingProxyType(
    {"enable.idempotence": "true", "acks": "all"}
)
_ALLOWED_VALUES = {"enable.idempotence": {"true"}, "acks": {"all", "-1"}}
_WHY = {
    "enable.idempotence": "without idempotence a retried send can duplicate or reorder messages "
    "within a partition, which breaks per-key order",
    "acks": "with acks other than all, a message the broker acknowledged can still be lost when "
    "its leader fails, and the relay would already have marked it published",
}
_MANAGED = {
    "bootstrap.servers": "use --kafka-bootstrap-servers (OUTBOX_KAFKA_BOOTSTRAP_SERVERS)",
    "message.timeout.ms": "use --delivery-timeout (OUTBOX_DELIVERY_TIMEOUT)",
    "delivery.timeout.ms": "use --delivery-timeout (OUTBOX_DELIVERY_TIMEOUT)",
    "transactional.id": "the relay does not use Kafka transactions",
}


def default_relay_id() -> str:
    """host-pid-random: unique per process, readable in logs and pg_stat_activity."""
    return f"{socket.gethostname()}-{os.getpid()}-{secrets.token_hex(2)}"


def parse_kafka_config(pairs: tuple[str, ...] | list[str]) -> dict[str, str]:
    """Turn repeated ``key=value`` options into librdkafka settings, refusing unsafe ones."""
    config: dict[str, str] = {}
    for pair in pairs:
        key, sep, value = pair.partition("=")
        key = key.strip()
        if not sep or not key:
            raise ConfigurationError(f"--kafka-config expects key=value, got {pair!r}")
        config[key] = value.strip()
    check_kafka_config(config)
    return config


def check_kafka_config(config: Mapping[str, str]) -> None:
    for key, value in config.items():
        if key in _MANAGED:
            raise ConfigurationError(
                f"--kafka-config {key} is managed by the relay: {_MANAGED[key]}"
            )
        allowed = _ALLOWED_VALUES.get(key)
        if allowed is not None and value.lower() not in allowed:
            raise ConfigurationError(
                f"--kafka-config {key}={value} is refused: {_WHY[key]}; the relay always uses "
                f"{key}={GUARANTEED_KAFKA_SETTINGS[key]}"
            )


#: The key of a field's :class:`Option` in its metadata.
OPTION = "outbox_relay.option"


@dataclass(frozen=True, slots=True)
class Option:
    """How ``outbox-relay run`` takes one setting: the help, and the bounds that the command line
    and :class:`RelaySettings` both enforce. The flag follows from the field's name unless given
    (``batch_size``: ``--batch-size``), and the environment variable from the flag
    (``OUTBOX_BATCH_SIZE``)."""

    help: str
    minimum: float | None = None
    maximum: float | None = None
    #: The flag, where it is not the field's name (``--on-dead-letter`` for a bool).
    flag: str | None = None
    #: Words the option accepts, each with the setting's value it stands for.
    choices: Mapping[str, object] | None = None
    #: Repeatable; the values reach ``parse`` as a tuple.
    multiple: bool = False
    #: Turns what the command line read into the setting's value.
    parse: Callable[[Any], object] | None = None
    #: The default as ``--help`` shows it, where the field's own default would mislead.
    shown_default: str | None = None

    def check(self, name: str, value: object) -> None:
        """ConfigurationError naming the setting unless ``value`` is within the bounds."""
        if not isinstance(value, int | float) or isinstance(value, bool):
            return
        if self.minimum is not None and value < self.minimum:
            raise ConfigurationError(f"{name} must be at least {self.minimum:g}, got {value}")
        if self.maximum is not None and value > self.maximum:
            raise ConfigurationError(f"{name} must be at most {self.maximum:g}, got {value}")


def setting(
    default: Any = MISSING, *, factory: Callable[[], Any] | None = None, **option: Any
) -> Any:
    """A settings field with its :class:`Option` (help, bounds) beside it."""
    metadata = {OPTION: Option(**option)}
    if factory is not None:
        return field(default_factory=factory, metadata=metadata)
    return field(default=default, metadata=metadata)


def option_of(name: str) -> Option | None:
    """The :class:`Option` of the ``RelaySettings`` field ``name`` (None: not an option)."""
    found = RelaySettings.__dataclass_fields__[name].metadata.get(OPTION)
    return found if isinstance(found, Option) else None


#: What each event becomes on Kafka (``outbox_relay.records``).
RECORD_FORMATS = ("native", "debezium", "cloudevents-binary", "cloudevents-structured")

_DEAD_LETTER_POLICY = {"proceed": False, "block": True}


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Everything a relay needs; ``outbox-relay run`` maps one flag and one variable to each."""

    database_url: str = setting(
        help="PostgreSQL URL: postgresql://user:pass@host:5432/db (libpq) or "
        "postgresql+psycopg://... (SQLAlchemy).",
    )
    kafka_bootstrap_servers: str = setting(help="Kafka brokers, host:port[,...].")
    #: Where the outbox tables are (``--schema``, ``--table-prefix``, shared by every command).
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    kafka_config: Mapping[str, str] = setting(
        factory=dict,
        help="Extra librdkafka producer setting, key=value (repeatable; whitespace-separated in "
        "the variable), e.g. security.protocol=SASL_SSL. Idempotence and acks=all cannot be "
        "turned off.",
        multiple=True,
        parse=parse_kafka_config,
        shown_default="none",
    )
    relay_id: str = setting(
        factory=default_relay_id,
        help="Name of this relay in logs and pg_stat_activity.",
        shown_default="host-pid-random",
    )
    # A crash can resend up to one batch, and a batch's payloads are held in memory.
    batch_size: int = setting(5000, help="Rows per batch (one transaction, one flush).", minimum=1)
    batch_max_bytes: int = setting(
        16 * 1024 * 1024,
        help="Payload bytes per batch at most (the oldest row always fits); bounds memory.",
        minimum=1,
    )
    poll_interval: float = setting(
        1.0,
        help="Longest wait of an idle relay before it claims anyway. New events wake it sooner, "
        "late commits included; a retry falling due, or a row put back by `dead-letters retry` "
        "or `replay`, may wait for it.",
        minimum=0.01,
    )
    idle_tick: float = setting(
        0.006,
        help="Longest tick of the idle wait once an outbox has been quiet for long: the tick "
        "starts at 6ms and grows by 1ms a second of quiet up to this, so a lone event after a "
        "long quiet waits up to this much more to be noticed, and a quiet outbox costs "
        "PostgreSQL less. With several outboxes the default is 200ms.",
        minimum=0.001,
        maximum=1.0,
        shown_default="6ms; 200ms with several outboxes",
    )
    backoff_base: float = setting(
        1.0,
        help="Retry delay of a failed row: random(0, min(cap, base * 2**attempt)).",
        minimum=0.001,
    )
    backoff_cap: float = setting(300.0, help="Longest retry delay of a failed row.", minimum=0.001)
    max_attempts: int = setting(
        10, help="Failed deliveries before a row is dead-lettered.", minimum=1
    )
    dead_letter_blocks_key: bool = setting(
        False,
        flag="--on-dead-letter",
        choices=_DEAD_LETTER_POLICY,
        help="After a row of a key is dead-lettered: later rows of the key proceed, or stay "
        "blocked until an operator acts. Give `status` the relays' value.",
    )
    rebalance_interval: float = setting(
        2.0,
        help="Time between shard rebalances; bounds the takeover of a dead relay's shards.",
        minimum=0.01,
    )
    retention: float = setting(
        0.0,
        help="How long to keep published rows; 0 deletes on publish. Above 0, each row moves to "
        "the published-events table, partitioned by publication time, and is dropped with its "
        "partition: kept at least this long, at most this plus a partition's span (an eighth of "
        "it, 1 s to 1 day). Give `status` the relays' value: above 0, it counts the events "
        "published in the last minute.",
        minimum=0,
    )
    record_format: str = setting(
        "native",
        choices={f: f for f in RECORD_FORMATS},
        help="What each event becomes on Kafka: native (the payload, the event's headers and "
        "event_id), debezium (as Debezium's Outbox Event Router: the id in the header `id`), "
        "cloudevents-binary (CloudEvents 1.0, attributes in ce_ headers) or "
        "cloudevents-structured (the whole CloudEvent as application/cloudevents+json).",
    )
    cloudevents_source: str = setting(
        "",
        help="CloudEvents source of the events whose writer set no ce_source header "
        "(a URI-reference).",
        shown_default="/outbox/<database name>",
    )
    cloudevents_type: str = setting(
        "",
        help="CloudEvents type of the events whose writer set no ce_type header.",
        shown_default="the event's topic",
    )
    connect_timeout: float = setting(
        10.0,
        help="How long to wait for PostgreSQL to accept the connection.",
        minimum=1,
    )
    statement_timeout: float = setting(
        30.0,
        help="PostgreSQL statement_timeout of the relay's sessions.",
        minimum=0.1,
    )
    lock_timeout: float = setting(
        5.0,
        help="PostgreSQL lock_timeout of the relay's sessions. Not `schema apply`'s lock wait "
        "(OUTBOX_MIGRATION_LOCK_TIMEOUT).",
        minimum=0.1,
    )
    delivery_timeout: float = setting(
        30.0,
        help="Bound on one message's delivery (librdkafka message.timeout.ms).",
        minimum=0.1,
    )
    grace_period: float = setting(
        30.0,
        help="Time to finish the in-flight batch after SIGTERM/SIGINT.",
        minimum=0.1,
    )
    breaker_threshold: int = setting(
        3,
        help="Consecutive failed batches that stop claiming (circuit breaker).",
        minimum=1,
    )
    breaker_cooldown: float = setting(
        5.0,
        help="Wait before a small probe batch once the breaker opened (grows with jitter).",
        minimum=0.01,
    )
    breaker_max_cooldown: float = setting(
        60.0,
        help="Longest wait between probe batches while the breaker stays open.",
        minimum=0.01,
    )
    probe_size: int = setting(10, help="Rows in a probe batch.", minimum=1)
    prefetch: bool = setting(
        True,
        help="Claim the next batch on a second connection while the current one is published.",
    )
    # Off by default: a commit lost in a database crash only makes its rows unpublished again,
    # so they are sent again (duplicates, never a loss). outbox.add keeps the application's own.
    synchronous_commit: bool = setting(
        False,
        help="Make the relay's own commits (rows marked published) wait for the disk. Off: a "
        "database crash can undo its last commits, and those rows are sent again (duplicates, "
        "never a loss).",
    )
    exit_when_idle: bool = setting(
        False,
        help="Exit 0 once no deliverable row is left (for scripts and tests), after logging "
        "relay.drained: rows published and seconds from the first claim to the last commit.",
    )
    metrics_port: int | None = setting(
        None,
        help="Serve Prometheus /metrics and the /healthz and /readyz probes on this port.",
        minimum=1,
        maximum=65535,
        shown_default="not served",
    )
    metrics_host: str = setting(
        "0.0.0.0",  # noqa: S104 - a metrics endpoint is meant to be scraped
        help="Address the metrics server listens on.",
    )

    def __post_init__(self) -> None:
        if not self.kafka_bootstrap_servers.strip():
            raise ConfigurationError(
                "no Kafka address given: pass --kafka-bootstrap-servers or set "
                "OUTBOX_KAFKA_BOOTSTRAP_SERVERS (for example localhost:9092)"
            )
        check_kafka_config(self.kafka_config)
        if self.record_format not in RECORD_FORMATS:
            raise ConfigurationError(
                f"record_format must be one of {', '.join(RECORD_FORMATS)}, "
                f"got {self.record_format!r}"
            )
        if any(c.isspace() for c in self.cloudevents_source):
            raise ConfigurationError(
                "cloudevents_source must be a URI-reference (no whitespace), "
                f"got {self.cloudevents_source!r}"
            )
        for each in fields(self):
            option = each.metadata.get(OPTION)
            if isinstance(option, Option):
                option.check(each.name, getattr(self, each.name))
