"""Relay settings: --kafka-config parsing, refused overrides, validation, the producer config."""

from __future__ import annotations

import dataclasses
from typing import Any

import pytest

from outbox import ConfigurationError
from outbox_relay.config import RelaySettings, parse_kafka_config
from outbox_relay.kafka import producer_config

DB = "postgresql://app@localhost/shop"


def _settings(**overrides: Any) -> RelaySettings:
    overrides.setdefault("kafka_bootstrap_servers", "localhost:9092")
    return RelaySettings(database_url=DB, **overrides)


# parse_kafka_config


def test_parse_kafka_config_accepts_key_value_pairs() -> None:
    """Pairs become a dict; whitespace around key and value is dropped."""
    config = parse_kafka_config(
        ["compression.type=zstd", " security.protocol = SASL_SSL ", "linger.ms=20"]
    )
    assert config == {
        "compression.type": "zstd",
        "security.protocol": "SASL_SSL",
        "linger.ms": "20",
    }


def test_parse_kafka_config_keeps_equals_signs_in_the_value() -> None:
    """Only the first '=' separates: JAAS-style values survive."""
    config = parse_kafka_config(["sasl.jaas.config=a=b c=d"])
    assert config == {"sasl.jaas.config": "a=b c=d"}


def test_parse_kafka_config_of_nothing_is_empty() -> None:
    """No --kafka-config at all is fine."""
    assert parse_kafka_config(()) == {}


@pytest.mark.parametrize(
    "pair", ["enable.idempotence=true", "enable.idempotence=TRUE", "acks=all", "acks=-1"]
)
def test_parse_kafka_config_accepts_the_guaranteed_values(pair: str) -> None:
    """Restating the relay's own idempotence and acks settings is harmless."""
    key, _, value = pair.partition("=")
    assert parse_kafka_config([pair]) == {key: value}


@pytest.mark.parametrize(
    ("pair", "explains"),
    [
        pytest.param("enable.idempotence=false", "idempotence", id="idempotence-off"),
        pytest.param("enable.idempotence=0", "idempotence", id="idempotence-zero"),
        pytest.param("acks=1", "acks", id="acks-1"),
        pytest.param("acks=0", "acks", id="acks-0"),
    ],
)
def test_parse_kafka_config_refuses_weaker_guarantees(pair: str, explains: str) -> None:
    """Turning off idempotence or acks=all is refused, saying why and what the relay uses."""
    with pytest.raises(ConfigurationError) as info:
        parse_kafka_config(["compression.type=lz4", pair])
    message = str(info.value)
    assert pair in message
    assert "refused" in message
    assert explains in message
    assert "the relay always uses" in message


@pytest.mark.parametrize(
    ("key", "points_to"),
    [
        ("bootstrap.servers", "--kafka-bootstrap-servers"),
        ("message.timeout.ms", "--delivery-timeout"),
        ("delivery.timeout.ms", "--delivery-timeout"),
        ("transactional.id", "transactions"),
    ],
)
def test_parse_kafka_config_refuses_settings_the_relay_manages(key: str, points_to: str) -> None:
    """Settings with a dedicated option (or none at all) are refused with a pointer."""
    with pytest.raises(ConfigurationError) as info:
        parse_kafka_config([f"{key}=x"])
    message = str(info.value)
    assert key in message
    assert "managed by the relay" in message
    assert points_to in message


@pytest.mark.parametrize("pair", ["compression.type", "=zstd", "  =1", "", "   "])
def test_parse_kafka_config_refuses_malformed_pairs(pair: str) -> None:
    """Anything that is not key=value is refused, quoting what was given."""
    with pytest.raises(ConfigurationError) as info:
        parse_kafka_config([pair])
    message = str(info.value)
    assert "key=value" in message
    assert repr(pair) in message


# RelaySettings


@pytest.mark.parametrize("servers", ["", "   "])
def test_settings_refuse_empty_bootstrap_servers(servers: str) -> None:
    """No Kafka address is an error naming the option and the variable."""
    with pytest.raises(ConfigurationError) as info:
        RelaySettings(database_url=DB, kafka_bootstrap_servers=servers)
    message = str(info.value)
    assert "--kafka-bootstrap-servers" in message
    assert "OUTBOX_KAFKA_BOOTSTRAP_SERVERS" in message


POSITIVE_FIELDS = [
    "batch_size",
    "max_attempts",
    "breaker_threshold",
    "probe_size",
    "poll_interval",
    "backoff_base",
    "backoff_cap",
    "rebalance_interval",
    "connect_timeout",
    "statement_timeout",
    "lock_timeout",
    "delivery_timeout",
    "grace_period",
    "breaker_cooldown",
    "breaker_max_cooldown",
]


@pytest.mark.parametrize("name", POSITIVE_FIELDS)
@pytest.mark.parametrize("value", [0, -1])
def test_settings_refuse_non_positive_numbers(name: str, value: int) -> None:
    """Zero or negative counts and durations are refused, naming the setting."""
    with pytest.raises(ConfigurationError) as info:
        _settings(**{name: value})
    assert name in str(info.value)
    assert "must be at least" in str(info.value)


def test_settings_refuse_negative_retention_but_accept_zero() -> None:
    """retention 0 means delete on publish; below 0 means nothing."""
    assert _settings(retention=0).retention == 0
    with pytest.raises(ConfigurationError, match="retention"):
        _settings(retention=-1)


def test_settings_refuse_unsafe_kafka_config_given_directly() -> None:
    """The library path (no CLI) checks kafka_config too."""
    with pytest.raises(ConfigurationError, match="acks"):
        _settings(kafka_config={"acks": "1"})
    with pytest.raises(ConfigurationError, match="managed by the relay"):
        _settings(kafka_config={"bootstrap.servers": "elsewhere:9092"})


def test_settings_are_frozen() -> None:
    """One validated object, shared by every part: nobody can change it afterwards."""
    settings = _settings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.batch_size = 5  # type: ignore[misc]


def test_default_relay_ids_differ() -> None:
    """Two relays started without --relay-id get different names."""
    assert _settings().relay_id != _settings().relay_id


# producer_config


def test_producer_config_guarantees_idempotence_and_acks_all() -> None:
    """Idempotence and acks=all are always on, and the bootstrap comes from its own setting."""
    config = producer_config(_settings(kafka_bootstrap_servers="k1:9092,k2:9092"))
    assert config["enable.idempotence"] == "true"
    assert config["acks"] == "all"
    assert config["bootstrap.servers"] == "k1:9092,k2:9092"


def test_producer_config_uses_the_java_compatible_partitioner_by_default() -> None:
    """murmur2_random puts a key on the partition a Java producer would choose."""
    assert producer_config(_settings())["partitioner"] == "murmur2_random"


def test_producer_config_lets_the_user_choose_the_partitioner() -> None:
    """An explicit partitioner is a deliberate choice and is kept."""
    config = producer_config(_settings(kafka_config={"partitioner": "consistent_random"}))
    assert config["partitioner"] == "consistent_random"


@pytest.mark.parametrize(("seconds", "ms"), [(30.0, 30_000), (2.5, 2_500), (0.1234, 123)])
def test_producer_config_takes_message_timeout_from_delivery_timeout(
    seconds: float, ms: int
) -> None:
    """message.timeout.ms is --delivery-timeout in milliseconds."""
    assert producer_config(_settings(delivery_timeout=seconds))["message.timeout.ms"] == ms


def test_producer_config_reports_unknown_topics_before_the_message_times_out() -> None:
    """A missing topic must fail as unknown (a row error), not time out (a broker error)."""
    for seconds in (0.5, 3.0, 5.0, 30.0, 120.0):
        config = producer_config(_settings(delivery_timeout=seconds))
        assert config["topic.metadata.propagation.max.ms"] < config["message.timeout.ms"]


def test_producer_config_keeps_pass_through_settings() -> None:
    """User settings such as compression.type and security.protocol reach librdkafka."""
    config = producer_config(
        _settings(
            kafka_config={
                "compression.type": "zstd",
                "security.protocol": "SASL_SSL",
                "linger.ms": "50",
            }
        )
    )
    assert config["compression.type"] == "zstd"
    assert config["security.protocol"] == "SASL_SSL"
    assert config["linger.ms"] == "50"


def test_producer_config_names_the_client_after_the_relay() -> None:
    """The relay id shows up as the Kafka client.id, for the broker's logs and quotas."""
    assert producer_config(_settings(relay_id="r-7"))["client.id"] == "outbox-relay-r-7"
