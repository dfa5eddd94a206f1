"""The CLI's options without a server: each is defined once, and each variable sets one thing.

The commands run in this process with click's runner; what would touch PostgreSQL or Kafka is
replaced by a recorder, so a test sees exactly the values an option reached.
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime as dt
import logging
import os
import re
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import click
import pytest
import structlog
from click.testing import CliRunner

import outbox_relay
from outbox import dedup, migrator
from outbox.errors import ConfigurationError
from outbox_relay import pg
from outbox_relay.cli import cli, duration
from outbox_relay.cli import relay as run_module
from outbox_relay.config import RelaySettings

URL = "postgresql://app@127.0.0.1:5432/shop"


@contextlib.contextmanager
def restored_logging() -> Iterator[None]:
    """The command configures logging for the whole process; put it back afterwards."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    try:
        yield
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)
        structlog.contextvars.clear_contextvars()


def invoke(*args: str, env: dict[str, str] | None = None) -> click.testing.Result:
    """``outbox-relay ARGS`` in this process, with no OUTBOX_* variable but ``env``'s."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OUTBOX_")}
    with restored_logging():
        result = CliRunner().invoke(cli, list(args), env={**unset, **(env or {})})
    assert result.exit_code == 0, (result.output, result.exception)
    return result


@pytest.fixture
def applied(monkeypatch: pytest.MonkeyPatch) -> list[int]:
    """The lock_timeout_ms each ``schema apply`` passed to the migrator (nothing connects)."""
    seen: list[int] = []

    def apply(conn: Any, settings: Any, *, lock_timeout_ms: int) -> list[Any]:
        seen.append(lock_timeout_ms)
        return []

    monkeypatch.setattr(pg, "connect", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(migrator, "apply", apply)
    return seen


@pytest.fixture
def served(monkeypatch: pytest.MonkeyPatch) -> list[RelaySettings]:
    """The settings each ``run`` would have served with (no producer, no relay)."""
    seen: list[RelaySettings] = []

    class Publisher:
        def __init__(self, settings: RelaySettings) -> None:
            self.settings = settings

        def check_reachable(self, timeout: float) -> None:
            raise AssertionError("not called: serve is replaced")

    monkeypatch.setattr(run_module, "KafkaPublisher", Publisher)
    monkeypatch.setattr(run_module, "serve", lambda settings, *a, **kw: seen.append(settings))
    return seen


def command(*path: str) -> click.Command:
    found: click.Command = cli
    for name in path:
        assert isinstance(found, click.Group)
        found = found.commands[name]
    return found


def option(cmd: click.Command, envvar: str) -> click.Option:
    """The one option of ``cmd`` read from ``envvar``."""
    (found,) = [p for p in cmd.params if isinstance(p, click.Option) and p.envvar == envvar]
    return found


def run_args(*extra: str) -> list[str]:
    return ["run", "--database-url", URL, "--kafka-bootstrap-servers", "k:9092", *extra]


# --- --on-dead-letter: one definition -------------------------------------------------------


def test_on_dead_letter_is_one_option_shared_by_run_and_status() -> None:
    """`run` and `status` take the same --on-dead-letter: flag, variable, choices and help."""
    in_run = option(command("run"), "OUTBOX_ON_DEAD_LETTER").to_info_dict()
    in_status = option(command("status"), "OUTBOX_ON_DEAD_LETTER").to_info_dict()
    assert in_run == in_status


def test_on_dead_letter_is_defined_once_in_the_source() -> None:
    """The option's flag is written once, beside its setting (a second copy is how the two
    drifted)."""
    sources = Path(outbox_relay.__file__).parent.rglob("*.py")
    found = [
        p.name for p in sources for _ in re.finditer(r"[\"']--on-dead-letter[\"']", p.read_text())
    ]
    assert found == ["config.py"]


@pytest.mark.parametrize(("value", "blocks"), [("block", True), ("proceed", False)])
def test_on_dead_letter_reaches_the_relay(
    served: list[RelaySettings], value: str, blocks: bool
) -> None:
    invoke(*run_args("--on-dead-letter", value))
    invoke(*run_args(), env={"OUTBOX_ON_DEAD_LETTER": value})
    assert [s.dead_letter_blocks_key for s in served] == [blocks, blocks]


# --- lock timeouts: one variable each ---------------------------------------------------------


def test_schema_apply_lock_wait_has_its_own_variable(applied: list[int]) -> None:
    """OUTBOX_MIGRATION_LOCK_TIMEOUT sets `schema apply`'s lock wait; the relays' variable
    OUTBOX_LOCK_TIMEOUT does not."""
    invoke("schema", "apply", "--database-url", URL)
    invoke("schema", "apply", "--database-url", URL, env={"OUTBOX_MIGRATION_LOCK_TIMEOUT": "7"})
    invoke("schema", "apply", "--database-url", URL, env={"OUTBOX_LOCK_TIMEOUT": "1"})
    assert applied == [60_000, 7_000, 60_000]


def test_relay_lock_timeout_ignores_the_migration_variable(served: list[RelaySettings]) -> None:
    """OUTBOX_LOCK_TIMEOUT sets the relays' session lock_timeout; the migration's does not."""
    invoke(*run_args())
    invoke(*run_args(), env={"OUTBOX_LOCK_TIMEOUT": "2"})
    invoke(*run_args(), env={"OUTBOX_MIGRATION_LOCK_TIMEOUT": "30"})
    assert [s.lock_timeout for s in served] == [5.0, 2.0, 5.0]


def test_help_names_each_lock_timeout_variable() -> None:
    """Each --help shows its own variable and names the other, so neither is set by mistake."""
    apply_help = " ".join(invoke("schema", "apply", "--help").output.split())
    run_help = " ".join(invoke("run", "--help").output.split())
    assert "env var: OUTBOX_MIGRATION_LOCK_TIMEOUT" in apply_help
    assert "env var: OUTBOX_LOCK_TIMEOUT" not in apply_help
    assert "OUTBOX_LOCK_TIMEOUT" in apply_help
    assert "env var: OUTBOX_LOCK_TIMEOUT" in run_help
    assert "OUTBOX_MIGRATION_LOCK_TIMEOUT" in run_help


# --- OUTBOX_RETENTION: parsed one way ---------------------------------------------------------


def test_retention_is_one_option_shared_by_run_and_status() -> None:
    """`run` and `status` read OUTBOX_RETENTION through the same option: name, type, bounds."""
    in_run = option(command("run"), "OUTBOX_RETENTION").to_info_dict()
    in_status = option(command("status"), "OUTBOX_RETENTION").to_info_dict()
    assert in_run == in_status


def parsed(cmd: click.Command, monkeypatch: pytest.MonkeyPatch, value: str) -> object:
    """What ``cmd`` makes of OUTBOX_RETENTION=value: the value, or the error's type."""
    monkeypatch.setenv("OUTBOX_RETENTION", value)
    param = option(cmd, "OUTBOX_RETENTION")
    try:
        with cmd.make_context(cmd.name, [], resilient_parsing=False) as ctx:
            return ctx.params[param.name or ""]
    except click.BadParameter as exc:
        return type(exc)


@pytest.mark.parametrize("value", ["0", "3600", "1.5", "1e3", "-1", "12h", "soon"])
def test_retention_variable_means_the_same_to_run_and_status(
    monkeypatch: pytest.MonkeyPatch, value: str
) -> None:
    """A value run accepts, status accepts as the same number; one run refuses, status refuses."""
    for name in list(os.environ):
        if name.startswith("OUTBOX_"):
            monkeypatch.delenv(name)
    assert parsed(command("run"), monkeypatch, value) == parsed(
        command("status"), monkeypatch, value
    )


# --- run's options are generated from RelaySettings ----------------------------------------

#: Each setting's variable, a value other than the default, and what the setting becomes.
VARIABLES: dict[str, tuple[str, str, object]] = {
    "database_url": ("OUTBOX_DATABASE_URL", "postgresql://db/x", "postgresql://db/x"),
    "kafka_bootstrap_servers": ("OUTBOX_KAFKA_BOOTSTRAP_SERVERS", "b1:9092,b2:9", "b1:9092,b2:9"),
    "kafka_config": ("OUTBOX_KAFKA_CONFIG", "linger.ms=7", {"linger.ms": "7"}),
    "relay_id": ("OUTBOX_RELAY_ID", "relay-a", "relay-a"),
    "batch_size": ("OUTBOX_BATCH_SIZE", "17", 17),
    "batch_max_bytes": ("OUTBOX_BATCH_MAX_BYTES", "4096", 4096),
    "poll_interval": ("OUTBOX_POLL_INTERVAL", "0.25", 0.25),
    "idle_tick": ("OUTBOX_IDLE_TICK", "50ms", 0.05),
    "backoff_base": ("OUTBOX_BACKOFF_BASE", "0.5", 0.5),
    "backoff_cap": ("OUTBOX_BACKOFF_CAP", "9", 9.0),
    "max_attempts": ("OUTBOX_MAX_ATTEMPTS", "4", 4),
    "dead_letter_blocks_key": ("OUTBOX_ON_DEAD_LETTER", "block", True),
    "rebalance_interval": ("OUTBOX_REBALANCE_INTERVAL", "0.5", 0.5),
    "retention": ("OUTBOX_RETENTION", "3600", 3600.0),
    "record_format": ("OUTBOX_RECORD_FORMAT", "cloudevents-binary", "cloudevents-binary"),
    "cloudevents_source": ("OUTBOX_CLOUDEVENTS_SOURCE", "urn:shop", "urn:shop"),
    "cloudevents_type": ("OUTBOX_CLOUDEVENTS_TYPE", "com.example.event", "com.example.event"),
    "connect_timeout": ("OUTBOX_CONNECT_TIMEOUT", "3", 3.0),
    "statement_timeout": ("OUTBOX_STATEMENT_TIMEOUT", "12", 12.0),
    "lock_timeout": ("OUTBOX_LOCK_TIMEOUT", "2", 2.0),
    "delivery_timeout": ("OUTBOX_DELIVERY_TIMEOUT", "45", 45.0),
    "grace_period": ("OUTBOX_GRACE_PERIOD", "7", 7.0),
    "breaker_threshold": ("OUTBOX_BREAKER_THRESHOLD", "5", 5),
    "breaker_cooldown": ("OUTBOX_BREAKER_COOLDOWN", "1.5", 1.5),
    "breaker_max_cooldown": ("OUTBOX_BREAKER_MAX_COOLDOWN", "90", 90.0),
    "probe_size": ("OUTBOX_PROBE_SIZE", "3", 3),
    "prefetch": ("OUTBOX_PREFETCH", "false", False),
    "synchronous_commit": ("OUTBOX_SYNCHRONOUS_COMMIT", "true", True),
    "exit_when_idle": ("OUTBOX_EXIT_WHEN_IDLE", "true", True),
    "metrics_port": ("OUTBOX_METRICS_PORT", "9187", 9187),
    "metrics_host": ("OUTBOX_METRICS_HOST", "127.0.0.1", "127.0.0.1"),
}


def test_every_setting_but_the_location_is_an_option_of_run() -> None:
    """Each RelaySettings field has exactly one option of `run`, read from OUTBOX_<FIELD>;
    the outbox's location comes from --schema and --table-prefix."""
    fields = {f.name for f in dataclasses.fields(RelaySettings)} - {"outbox"}
    assert set(VARIABLES) == fields
    by_variable = {p.envvar: p.name for p in command("run").params if isinstance(p, click.Option)}
    location = {"OUTBOX_SCHEMA": "schema_name", "OUTBOX_TABLE_PREFIX": "table_prefix"}
    # --database-url is repeatable (several outboxes), and two options name outboxes instead.
    fleet = {
        "OUTBOX_DATABASE_URL": "database_urls",
        "OUTBOX_OUTBOXES": "outboxes_file",
        "OUTBOX_FLEET_DATABASE_URL": "fleet_database_url",
    }
    generated = {variable: name for name, (variable, _, _) in VARIABLES.items()}
    assert generated | location | fleet == by_variable


@pytest.mark.parametrize("name", sorted(VARIABLES))
def test_each_variable_reaches_its_setting(served: list[RelaySettings], name: str) -> None:
    """A variable changes its own setting and no other one."""
    variable, value, expected = VARIABLES[name]
    env = {"OUTBOX_DATABASE_URL": URL, "OUTBOX_KAFKA_BOOTSTRAP_SERVERS": "k:9092"}
    invoke("run", env=env)
    invoke("run", env={**env, variable: value})
    default, changed = (dataclasses.asdict(s) for s in served)
    assert changed[name] == expected
    assert {k for k in changed if changed[k] != default[k]} - {"relay_id"} == {name} - {"relay_id"}


@pytest.mark.parametrize(
    ("flag", "value", "refused"),
    [
        ("--batch-size", "0", "0 is not in the range x>=1"),
        ("--poll-interval", "0.001", "'0.001' is shorter than 0.01s"),
        ("--metrics-port", "70000", "70000 is not in the range 1<=x<=65535"),
        ("--retention", "-1", "'-1' is shorter than 0s"),
    ],
)
def test_the_command_line_and_the_settings_enforce_the_same_bounds(
    flag: str, value: str, refused: str
) -> None:
    """A value out of a setting's bounds is refused by click, and by RelaySettings itself."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OUTBOX_")}
    with restored_logging():
        result = CliRunner().invoke(cli, run_args(flag, value), env=unset)
    assert result.exit_code == 2
    assert refused in result.output
    name = flag.removeprefix("--").replace("-", "_")
    with pytest.raises(ConfigurationError, match=f"{name} must be at"):
        RelaySettings(database_url=URL, kafka_bootstrap_servers="k:9092", **{name: float(value)})


# --- --kafka-config: what librdkafka refuses is a usage error ---------------------------------


def refused(*args: str) -> click.testing.Result:
    """``outbox-relay ARGS`` in this process, expected to exit 2 (bad usage or settings)."""
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OUTBOX_")}
    with restored_logging():
        result = CliRunner().invoke(cli, list(args), env=unset)
    assert result.exit_code == 2, (result.output, result.exception)
    return result


@pytest.mark.parametrize(
    ("pair", "named"),
    [
        pytest.param("security.protocl=SASL_SSL", "security.protocl", id="misspelt"),
        # librdkafka names the property by its canonical name, queue.buffering.max.ms.
        pytest.param("linger.ms=soon", "linger.ms", id="bad-value-of-an-alias"),
        pytest.param("compression.type=zip", "compression.type", id="bad-choice"),
        pytest.param("stats_cb=print", "stats_cb", id="python-callback"),
        pytest.param("default.topic.config=x", "default.topic.config", id="python-dict"),
    ],
)
def test_a_kafka_setting_librdkafka_refuses_is_one_line_naming_it(
    served: list[RelaySettings], pair: str, named: str
) -> None:
    """A --kafka-config property librdkafka does not know, or a value it does not take, exits 2
    with one line naming the property as given, before a producer is made."""
    result = refused(*run_args("--kafka-config", "linger.ms=5", "--kafka-config", pair))
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert lines[0].startswith(f"Error: --kafka-config {named} "), lines
    assert served == []


def test_a_refused_combination_of_kafka_settings_is_one_line(served: list[RelaySettings]) -> None:
    """Settings librdkafka takes one by one but not together (here with the idempotence the
    relay always turns on) are refused in one line with librdkafka's reason."""
    result = refused(*run_args("--kafka-config", "max.in.flight=10"))
    lines = result.output.strip().splitlines()
    assert len(lines) == 1, result.output
    assert "max.in.flight" in lines[0]
    assert "enable.idempotence" in lines[0]


def test_a_kafka_secret_is_not_repeated_in_the_refusal(served: list[RelaySettings]) -> None:
    """The line names the property, not its value: a misspelt password setting stays secret."""
    result = refused(*run_args("--kafka-config", "sasl.pasword=hunter2"))
    assert "sasl.pasword" in result.output
    assert "hunter2" not in result.output


def test_kafka_settings_librdkafka_takes_pass(served: list[RelaySettings]) -> None:
    """Known properties with good values, aliases included, reach the relay unchanged."""
    pairs = ["linger.ms=5", "compression.type=zstd", "security.protocol=PLAINTEXT"]
    invoke(*run_args(*(arg for pair in pairs for arg in ("--kafka-config", pair))))
    [settings] = served
    assert dict(settings.kafka_config) == dict(p.split("=") for p in pairs)


# --- durations: one syntax for every length of time -------------------------------------------


@pytest.mark.parametrize(
    ("text", "seconds"),
    [
        ("90", 90.0),
        ("1.5", 1.5),
        ("1e3", 1000.0),
        ("90s", 90.0),
        ("250ms", 0.25),
        ("15m", 900.0),
        ("12h", 43_200.0),
        ("7d", 604_800.0),
        ("0.5d", 43_200.0),
        (" 7d ", 604_800.0),
    ],
)
def test_a_duration_is_a_number_of_seconds_or_a_number_and_a_unit(
    text: str, seconds: float
) -> None:
    """A bare number is seconds, as every option took it before; ms, s, m, h and d scale it."""
    assert duration.Duration().convert(text, None, None) == seconds


@pytest.mark.parametrize("text", ["", "s", "ms", "7w", "7dd", "soon", "nan", "inf", "1h30m"])
def test_what_is_not_a_duration_is_refused_naming_the_syntax(text: str) -> None:
    with pytest.raises(click.BadParameter, match="is not a duration like 90s, 250ms, 15m"):
        duration.Duration().convert(text, None, None)


def test_a_duration_keeps_its_bounds() -> None:
    """The bounds are in seconds, whatever unit the value was given in."""
    bounded = duration.Duration(0.01, 3600)
    assert bounded.convert("10ms", None, None) == 0.01
    with pytest.raises(click.BadParameter, match=r"'9ms' is shorter than 0\.01s"):
        bounded.convert("9ms", None, None)
    with pytest.raises(click.BadParameter, match="'2h' is longer than 3600s"):
        bounded.convert("2h", None, None)
    with pytest.raises(click.BadParameter, match="'0s' is not longer than 0s"):
        duration.Duration(0, min_open=True).convert("0s", None, None)


def every_option() -> Iterator[tuple[str, click.Option]]:
    """Each option of each command of the tree, with the command's path."""

    def walk(cmd: click.Command, path: str) -> Iterator[tuple[str, click.Option]]:
        for param in cmd.params:
            if isinstance(param, click.Option):
                yield path, param
        for name, sub in getattr(cmd, "commands", {}).items():
            yield from walk(sub, f"{path} {name}".strip())

    return walk(cli, "")


def test_no_option_takes_a_bare_number_of_seconds() -> None:
    """Every option that is a length of time takes a duration: none is a float any more (a
    float option is how --retention came to refuse 7d while --older-than took it)."""
    floats = [
        f"{path} {p.opts[0]}"
        for path, p in every_option()
        if isinstance(p.type, click.types.FloatParamType)
    ]
    assert floats == []


@pytest.mark.parametrize(
    ("variable", "setting"),
    [
        ("OUTBOX_RETENTION", "retention"),
        ("OUTBOX_POLL_INTERVAL", "poll_interval"),
        ("OUTBOX_LOCK_TIMEOUT", "lock_timeout"),
        ("OUTBOX_BACKOFF_CAP", "backoff_cap"),
        ("OUTBOX_DELIVERY_TIMEOUT", "delivery_timeout"),
        ("OUTBOX_GRACE_PERIOD", "grace_period"),
    ],
)
def test_run_takes_durations_in_flags_and_variables(
    served: list[RelaySettings], variable: str, setting: str
) -> None:
    """`run --retention 7d` (issue 29) and the same in the variable reach the settings as
    seconds; a bare number still means seconds."""
    flag = "--" + setting.replace("_", "-")
    invoke(*run_args(flag, "2m"))
    invoke(*run_args(), env={variable: "2m"})
    invoke(*run_args(flag, "120"))
    assert [getattr(s, setting) for s in served] == [120.0, 120.0, 120.0]


def test_schema_apply_lock_wait_takes_a_duration(applied: list[int]) -> None:
    invoke("schema", "apply", "--database-url", URL, "--lock-timeout", "2m")
    invoke("schema", "apply", "--database-url", URL, env={"OUTBOX_MIGRATION_LOCK_TIMEOUT": "500ms"})
    assert applied == [120_000, 500]


def test_durations_in_help_show_their_unit() -> None:
    """--help shows a duration's default with its unit and says what a DURATION is."""
    text = " ".join(invoke("run", "--help").output.split())
    assert "--retention DURATION" in text
    assert "[env var: OUTBOX_RETENTION; default: 0s]" in text
    assert "--poll-interval DURATION" in text
    assert duration.SYNTAX in text


def test_dedup_purge_takes_the_same_durations(monkeypatch: pytest.MonkeyPatch) -> None:
    """`dedup purge --older-than` (OUTBOX_DEDUP_RETENTION) reads durations as the relays' options
    do, and still refuses a period that is not positive."""
    periods: list[dt.timedelta] = []

    def purge(conn: Any, older_than: dt.timedelta, **kwargs: Any) -> int:
        periods.append(older_than)
        return 0

    monkeypatch.setattr(pg, "connect", lambda *args, **kwargs: contextlib.nullcontext())
    monkeypatch.setattr(migrator, "require_current", lambda *args: None)
    monkeypatch.setattr(dedup, "purge", purge)
    invoke("dedup", "purge", "--database-url", URL, "--older-than", "7d")
    invoke("dedup", "purge", "--database-url", URL, env={"OUTBOX_DEDUP_RETENTION": "12h"})
    invoke("dedup", "purge", "--database-url", URL, "--older-than", "90")
    assert periods == [dt.timedelta(days=7), dt.timedelta(hours=12), dt.timedelta(seconds=90)]
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OUTBOX_")}
    with restored_logging():
        zero = CliRunner().invoke(cli, ["dedup", "purge", "--older-than", "0s"], env=unset)
    assert zero.exit_code == 2
    assert "'0s' is not longer than 0s" in zero.output


def test_status_max_lag_takes_a_duration() -> None:
    """`status --max-lag 5m` is 300 seconds."""
    cmd = command("status")
    with cmd.make_context("status", ["--max-lag", "5m"]) as ctx:
        assert ctx.params["max_lag"] == 300.0
