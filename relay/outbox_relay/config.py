"""The relay's settings: one frozen object, validated once, shared by every part of the daemon."""

from __future__ import annotations

import os
import secrets
import socket
from collections.abc import Mapping
from dataclasses import dataclass, field
from types import MappingProxyType

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


def _positive(name: str, value: float) -> None:
    if value <= 0:
        raise ConfigurationError(f"{name} must be positive, got {value}")


@dataclass(frozen=True, slots=True)
class RelaySettings:
    """Everything a relay needs; the CLI maps one flag and one environment variable to each."""

    database_url: str
    kafka_bootstrap_servers: str
    outbox: OutboxSettings = field(default_factory=OutboxSettings)
    kafka_config: Mapping[str, str] = field(default_factory=dict)
    relay_id: str = field(default_factory=default_relay_id)
    #: Rows claimed per batch (one transaction, one flush). Larger batches spread each batch's
    #: fixed costs (round trips, commit, waiting for Kafka's answer) over more rows: measured
    #: here, 5,000 drains a backlog about a quarter faster than 1,000. A crash can resend up to
    #: one batch, and a batch's payloads are held in memory (within ``batch_max_bytes``).
    batch_size: int = 5000
    #: Payload bytes fetched per batch at most (the first row always fits): bounds memory.
    batch_max_bytes: int = 16 * 1024 * 1024
    #: Seconds an idle relay waits at most before claiming anyway: new events wake it sooner
    #: (``outbox_relay.wakeup``); rows falling due for a retry wait for this.
    poll_interval: float = 1.0
    #: Per-row retry delay: random(0, min(backoff_cap, backoff_base * 2**attempt)) seconds.
    backoff_base: float = 1.0
    backoff_cap: float = 300.0
    #: Failed deliveries of one row before it is dead-lettered.
    max_attempts: int = 10
    #: Whether a dead-lettered row blocks the later rows of its key until an operator acts.
    dead_letter_blocks_key: bool = False
    #: Seconds between shard rebalances (also the bound on taking over a dead relay's shards).
    rebalance_interval: float = 2.0
    #: Seconds to keep published rows; 0 deletes a row as soon as it is published.
    retention: float = 0.0
    connect_timeout: float = 10.0
    statement_timeout: float = 30.0
    lock_timeout: float = 5.0
    #: librdkafka's message.timeout.ms, in seconds: the bound on one message's delivery.
    delivery_timeout: float = 30.0
    #: Seconds to finish the in-flight batch after SIGTERM/SIGINT.
    grace_period: float = 30.0
    #: Consecutive failed batches that open the circuit breaker, its first cool-down and cap.
    breaker_threshold: int = 3
    breaker_cooldown: float = 5.0
    breaker_max_cooldown: float = 60.0
    #: Rows in the probe batch sent when the breaker half-opens.
    probe_size: int = 10
    #: Claim the next batch (on a second connection) while the current one is published.
    prefetch: bool = True
    #: Whether the relay's own commits (rows marked published, failures recorded) wait for
    #: PostgreSQL to flush them to disk (``synchronous_commit``). Off by default: it takes the
    #: WAL flush out of every batch, and a commit lost in a database crash only makes its rows
    #: unpublished again, so they are sent again (duplicates, never a loss). Events written by
    #: ``outbox.add`` keep the application's own setting.
    synchronous_commit: bool = False
    #: Exit 0 once no unpublished, deliverable row is left (for scripts and tests).
    exit_when_idle: bool = False
    #: Port of the HTTP server for /metrics, /healthz and /readyz; None serves nothing.
    metrics_port: int | None = None
    #: Address that server listens on.
    metrics_host: str = "0.0.0.0"  # noqa: S104 - a metrics endpoint is meant to be scraped

    def __post_init__(self) -> None:
        if not self.kafka_bootstrap_servers.strip():
            raise ConfigurationError(
                "no Kafka address given: pass --kafka-bootstrap-servers or set "
                "OUTBOX_KAFKA_BOOTSTRAP_SERVERS (for example localhost:9092)"
            )
        check_kafka_config(self.kafka_config)
        for name in ("batch_size", "batch_max_bytes", "max_attempts", "breaker_threshold",
                     "probe_size"):  # fmt: skip
            _positive(name, getattr(self, name))
        for name in (
            "poll_interval", "backoff_base", "backoff_cap", "rebalance_interval",
            "connect_timeout", "statement_timeout", "lock_timeout", "delivery_timeout",
            "grace_period", "breaker_cooldown", "breaker_max_cooldown",
        ):  # fmt: skip
            _positive(name, getattr(self, name))
        if self.retention < 0:
            raise ConfigurationError(f"retention must be 0 or more seconds, got {self.retention}")
        if self.metrics_port is not None and not 1 <= self.metrics_port <= 65535:
            raise ConfigurationError(f"metrics_port must be 1..65535, got {self.metrics_port}")
