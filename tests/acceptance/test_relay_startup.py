"""`outbox-relay run` at start: bad settings, no schema, no database, no broker, env vars.

Each failure must end the process at once with its documented exit code and one actionable line
on stderr (no traceback, never the password); every setting can come from the environment.
"""

from __future__ import annotations

import dataclasses
import os
import subprocess
import time
from pathlib import Path

import psycopg
import pytest
from sqlalchemy import make_url

from outbox import testing
from outbox_relay.config import RelaySettings
from outbox_relay.exit_codes import ExitCode
from tests.acceptance.relay_harness import (
    RELAY,
    create_topic,
    read_topic,
    run_relay,
    start_relay,
    stop,
    unpublished,
    wait_until,
    write_events,
)

#: The environment variable of every RelaySettings field (``outbox`` is two of them).
SETTING_VARIABLES = {
    "database_url": ["OUTBOX_DATABASE_URL"],
    "kafka_bootstrap_servers": ["OUTBOX_KAFKA_BOOTSTRAP_SERVERS"],
    "outbox": ["OUTBOX_SCHEMA", "OUTBOX_TABLE_PREFIX"],
    "kafka_config": ["OUTBOX_KAFKA_CONFIG"],
    "relay_id": ["OUTBOX_RELAY_ID"],
    "batch_size": ["OUTBOX_BATCH_SIZE"],
    "batch_max_bytes": ["OUTBOX_BATCH_MAX_BYTES"],
    "poll_interval": ["OUTBOX_POLL_INTERVAL"],
    "idle_tick": ["OUTBOX_IDLE_TICK"],
    "backoff_base": ["OUTBOX_BACKOFF_BASE"],
    "backoff_cap": ["OUTBOX_BACKOFF_CAP"],
    "max_attempts": ["OUTBOX_MAX_ATTEMPTS"],
    "dead_letter_blocks_key": ["OUTBOX_ON_DEAD_LETTER"],
    "rebalance_interval": ["OUTBOX_REBALANCE_INTERVAL"],
    "retention": ["OUTBOX_RETENTION"],
    "record_format": ["OUTBOX_RECORD_FORMAT"],
    "cloudevents_source": ["OUTBOX_CLOUDEVENTS_SOURCE"],
    "cloudevents_type": ["OUTBOX_CLOUDEVENTS_TYPE"],
    "connect_timeout": ["OUTBOX_CONNECT_TIMEOUT"],
    "statement_timeout": ["OUTBOX_STATEMENT_TIMEOUT"],
    "lock_timeout": ["OUTBOX_LOCK_TIMEOUT"],
    "delivery_timeout": ["OUTBOX_DELIVERY_TIMEOUT"],
    "grace_period": ["OUTBOX_GRACE_PERIOD"],
    "breaker_threshold": ["OUTBOX_BREAKER_THRESHOLD"],
    "breaker_cooldown": ["OUTBOX_BREAKER_COOLDOWN"],
    "breaker_max_cooldown": ["OUTBOX_BREAKER_MAX_COOLDOWN"],
    "probe_size": ["OUTBOX_PROBE_SIZE"],
    "exit_when_idle": ["OUTBOX_EXIT_WHEN_IDLE"],
    "prefetch": ["OUTBOX_PREFETCH"],
    "synchronous_commit": ["OUTBOX_SYNCHRONOUS_COMMIT"],
    "metrics_port": ["OUTBOX_METRICS_PORT"],
    "metrics_host": ["OUTBOX_METRICS_HOST"],
}


def _env(**extra: str) -> dict[str, str]:
    """The environment without any OUTBOX_* setting of the developer's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return {**env, **extra}


def relay(
    *args: str, env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """`outbox-relay run ARGS` in a new process, its output captured."""
    return subprocess.run(
        [*RELAY, "run", *args],
        env=_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def assert_one_error_line(result: subprocess.CompletedProcess[str]) -> str:
    """stderr is exactly one ``Error: ...`` line, with no traceback; returns that line."""
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: "), result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    return lines[0]


def unreachable_database_url() -> str:
    """A URL (with a password) of a port where nothing listens."""
    return f"postgresql://app:hunter2@127.0.0.1:{testing.free_port()}/shop"


def test_unreachable_database_exits_4_naming_the_host() -> None:
    """No PostgreSQL at the URL: exit 4, one line naming host and port, never the password."""
    url = unreachable_database_url()
    port = url.split(":")[-1].split("/")[0]
    result = relay(
        "--database-url", url, "--kafka-bootstrap-servers", "127.0.0.1:9", "--connect-timeout", "2"
    )
    assert result.returncode == ExitCode.DATABASE_UNAVAILABLE, result.stderr
    line = assert_one_error_line(result)
    assert "PostgreSQL" in line
    assert f"127.0.0.1:{port}" in line
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize(
    ("args", "expected"),
    [
        pytest.param(
            ["--database-url", "mysql://app:hunter2@127.0.0.1/shop"],
            ["'mysql' is not supported", "postgresql://"],
            id="mysql-url",
        ),
        pytest.param(
            ["--database-url", "app:hunter2@127.0.0.1/shop"],
            [],
            id="not-a-url",
        ),
        pytest.param(
            ["--database-url", "postgresql://app:hunter2@127.0.0.1/shop?no_such_option=1"],
            ["no_such_option"],
            id="unknown-libpq-option",
        ),
        pytest.param([], ["OUTBOX_DATABASE_URL"], id="no-database-url"),
    ],
)
def test_bad_database_url_exits_2(args: list[str], expected: list[str]) -> None:
    """A missing, malformed or non-PostgreSQL URL is a usage error, without the password."""
    result = relay(*args, "--kafka-bootstrap-servers", "127.0.0.1:9")
    assert result.returncode == ExitCode.USAGE, result.stderr
    line = assert_one_error_line(result)
    for text in expected:
        assert text in line
    assert "hunter2" not in result.stderr + result.stdout


def test_missing_bootstrap_servers_exits_2_naming_the_variable() -> None:
    """Without a Kafka address the message says which flag or variable to set."""
    result = relay("--database-url", "postgresql://app:hunter2@127.0.0.1/shop")
    assert result.returncode == ExitCode.USAGE, result.stderr
    line = assert_one_error_line(result)
    assert "OUTBOX_KAFKA_BOOTSTRAP_SERVERS" in line
    assert "--kafka-bootstrap-servers" in line


@pytest.mark.parametrize(
    ("config", "expected"),
    [
        pytest.param(
            ["enable.idempotence=false"],
            ["enable.idempotence=false is refused", "reorder", "enable.idempotence=true"],
            id="no-idempotence",
        ),
        pytest.param(["acks=1"], ["acks=1 is refused", "lost", "acks=all"], id="acks-1"),
        pytest.param(["acks=0"], ["acks=0 is refused"], id="acks-0"),
        pytest.param(["linger.ms=1", "acks"], ["expects key=value", "'acks'"], id="no-equals"),
        pytest.param(["=1"], ["expects key=value"], id="no-key"),
        pytest.param(["message.timeout.ms=1000"], ["--delivery-timeout"], id="managed-setting"),
    ],
)
def test_unsafe_or_malformed_kafka_config_exits_2(config: list[str], expected: list[str]) -> None:
    """--kafka-config refuses settings that break the guarantees, and says why."""
    options = [arg for pair in config for arg in ("--kafka-config", pair)]
    result = relay(
        "--database-url",
        "postgresql://app@127.0.0.1/shop",
        "--kafka-bootstrap-servers",
        "127.0.0.1:9",
        *options,
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    line = assert_one_error_line(result)
    for text in expected:
        assert text in line


def test_unsafe_kafka_config_from_the_environment_exits_2() -> None:
    """OUTBOX_KAFKA_CONFIG is checked like the flag (whitespace-separated pairs)."""
    result = relay(
        env={
            "OUTBOX_DATABASE_URL": "postgresql://app@127.0.0.1/shop",
            "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "127.0.0.1:9",
            "OUTBOX_KAFKA_CONFIG": "linger.ms=1 acks=1",
        }
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    assert "acks=1 is refused" in assert_one_error_line(result)


def test_missing_schema_exits_3_naming_schema_apply(
    empty_database_url: str, kafka_bootstrap: str
) -> None:
    """A database without the outbox tables: exit 3 and the command that creates them."""
    result = relay(
        "--database-url", empty_database_url, "--kafka-bootstrap-servers", kafka_bootstrap
    )
    assert result.returncode == ExitCode.SCHEMA_NOT_CURRENT, result.stderr
    assert "outbox-relay schema apply" in assert_one_error_line(result)


def test_a_role_that_may_not_record_what_it_publishes_exits_2_naming_the_grant(
    database_url: str, kafka_bootstrap: str
) -> None:
    """With --retention the relay moves what it publishes to the table of published events: a
    role without INSERT there would send every batch and fail to record it, again and again.
    It stops at start instead, naming the privilege, and sends nothing."""
    role = "relay_without_insert"
    with psycopg.connect(database_url, autocommit=True) as admin:
        admin.execute(
            f"CREATE ROLE {role} LOGIN;"
            f" GRANT SELECT, UPDATE, DELETE ON outbox_events TO {role};"
            f" GRANT SELECT ON outbox_schema_migrations TO {role};"
            f" GRANT SELECT, INSERT, UPDATE, DELETE ON outbox_relays TO {role}"
        )
    topic = create_topic(kafka_bootstrap)
    write_events(database_url, topic, 3, keys=1)
    limited = make_url(database_url).set(username=role).render_as_string(hide_password=False)
    try:
        result = relay(
            "--database-url",
            limited,
            "--kafka-bootstrap-servers",
            kafka_bootstrap,
            "--retention",
            "1h",
            "--exit-when-idle",
        )
    finally:
        with psycopg.connect(database_url, autocommit=True) as admin:
            admin.execute(f"DROP OWNED BY {role}; DROP ROLE {role}")
    assert result.returncode == ExitCode.USAGE, result.stderr
    line = assert_one_error_line(result)
    assert 'INSERT on "public"."outbox_published"' in line
    assert "GRANT INSERT ON" in line
    assert unpublished(database_url) == 3
    assert read_topic(kafka_bootstrap, topic, expect_ids=set(), timeout=3) == []


def test_unreachable_broker_exits_5_naming_the_address(database_url: str) -> None:
    """No broker at the address: exit 5 within about --connect-timeout, naming the address."""
    address = f"127.0.0.1:{testing.free_port()}"
    result = relay(
        "--database-url",
        database_url,
        "--kafka-bootstrap-servers",
        address,
        "--connect-timeout",
        "2",
        timeout=30,
    )
    assert result.returncode == ExitCode.BROKER_UNAVAILABLE, result.stderr
    assert "Traceback" not in result.stderr + result.stdout
    errors = [line for line in result.stderr.splitlines() if line.startswith("Error: ")]
    assert len(errors) == 1, result.stderr
    assert address in errors[0]
    assert "Kafka" in errors[0]


def test_a_relay_that_fails_its_start_up_checks_takes_no_shard_from_a_running_one(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A second relay with a wrong Kafka address exits 5; while it checked the broker it must
    not have counted as a member, or the running relay would have let shards go to it and
    their events would have waited for the next rebalance after it died."""
    log_path = tmp_path / "running.log"
    running = start_relay(database_url, kafka_bootstrap, log=log_path)
    try:

        def owns_every_shard() -> bool:
            rebalanced = testing.log_events(log_path.read_text(), "shards.rebalanced")
            return bool(rebalanced) and rebalanced[-1]["owned"] == 256

        wait_until(owns_every_shard, timeout=30)
        address = f"127.0.0.1:{testing.free_port()}"
        failed = run_relay(database_url, address, "--connect-timeout", "3", timeout=60)
        assert failed.returncode == ExitCode.BROKER_UNAVAILABLE, failed.stderr
        time.sleep(1.5)  # three rebalance intervals of the running relay after the exit
    finally:
        assert stop(running) == 0
    rebalanced = testing.log_events(log_path.read_text(), "shards.rebalanced")
    assert [line["released"] for line in rebalanced] == [0] * len(rebalanced), rebalanced


def test_settings_from_environment_variables(database_url: str, kafka_bootstrap: str) -> None:
    """With only OUTBOX_* variables (no flags) the relay drains the outbox and exits 0."""
    topic = create_topic(kafka_bootstrap)
    ids = write_events(database_url, topic, 25, keys=5)
    result = relay(
        env={
            "OUTBOX_DATABASE_URL": database_url,
            "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": kafka_bootstrap,
            "OUTBOX_KAFKA_CONFIG": "linger.ms=1 acks=all",
            "OUTBOX_BATCH_SIZE": "7",
            "OUTBOX_RELAY_ID": "relay-from-env",
            "OUTBOX_POLL_INTERVAL": "0.2",
            "OUTBOX_EXIT_WHEN_IDLE": "true",
            "OUTBOX_LOG_FORMAT": "json",
        }
    )
    assert result.returncode == ExitCode.OK, result.stderr
    assert unpublished(database_url) == 0
    started = testing.log_events(result.stderr, "relay.started")
    assert len(started) == 1, result.stderr
    assert started[0]["batch_size"] == 7
    assert started[0]["relay_id"] == "relay-from-env"
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    assert {r.event_id for r in received} == set(ids)


def test_run_help_lists_every_environment_variable() -> None:
    """`run --help` names the environment variable of every relay setting."""
    fields = {f.name for f in dataclasses.fields(RelaySettings)}
    assert fields == set(SETTING_VARIABLES), "a relay setting has no variable in this test"
    result = relay("--help")
    assert result.returncode == 0, result.stderr
    missing = [
        variable
        for variables in SETTING_VARIABLES.values()
        for variable in variables
        if variable not in result.stdout
    ]
    assert missing == []
    # And the options that name the outboxes of a fleet, which are not settings of one relay.
    assert "OUTBOX_OUTBOXES" in result.stdout
    assert "OUTBOX_FLEET_DATABASE_URL" in result.stdout
