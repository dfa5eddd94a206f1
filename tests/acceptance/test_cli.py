"""The `outbox-relay` command as operators run it: real processes, real PostgreSQL, exit codes."""

from __future__ import annotations

import logging
import os
import subprocess
import sys
from pathlib import Path
from typing import Any

import psycopg
import pytest
import structlog
from click.testing import CliRunner, Result

from outbox import schema, testing, urls
from outbox.settings import OutboxSettings
from outbox_relay.cli import cli
from outbox_relay.exit_codes import ExitCode

CONSOLE_SCRIPT = Path(sys.executable).with_name("outbox-relay")
ENTRY_POINTS = {
    "module": [sys.executable, "-m", "outbox_relay"],
    "script": [str(CONSOLE_SCRIPT)],
}
LATEST = schema.latest_version()


def _env(**extra: str) -> dict[str, str]:
    """The environment without any OUTBOX_* setting of the developer's shell, plus ``extra``."""
    env = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return {**env, **extra}


def run(
    *args: str, via: str = "module", env: dict[str, str] | None = None, timeout: float = 60
) -> subprocess.CompletedProcess[str]:
    """Run the command in a new process and capture its output."""
    return subprocess.run(
        [*ENTRY_POINTS[via], *args],
        env=_env(**(env or {})),
        capture_output=True,
        text=True,
        timeout=timeout,
        check=False,
    )


def invoke(*args: str, env: dict[str, str | None] | None = None) -> Result:
    """Run the command in this process with click's runner, restoring the logging it sets up."""
    root = logging.getLogger()
    saved_handlers, saved_level = root.handlers[:], root.level
    saved_structlog = structlog.get_config()
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OUTBOX_")}
    try:
        return CliRunner().invoke(cli, list(args), env={**unset, **(env or {})})
    finally:
        root.handlers[:] = saved_handlers
        root.setLevel(saved_level)
        structlog.configure(**saved_structlog)


def _unreachable_url() -> str:
    """A URL with password hunter2 for a port nothing listens on."""
    return f"postgresql://app:hunter2@127.0.0.1:{testing.free_port()}/shop"


def _recorded_versions(url: str) -> list[Any]:
    with psycopg.connect(url) as conn:
        return conn.execute(
            "SELECT version, count(*) FROM outbox_schema_migrations GROUP BY version ORDER BY 1"
        ).fetchall()


def test_console_script_is_installed_next_to_python() -> None:
    """The `outbox-relay` console script exists where pip put it."""
    assert CONSOLE_SCRIPT.is_file()
    assert os.access(CONSOLE_SCRIPT, os.X_OK)


@pytest.mark.parametrize("via", ENTRY_POINTS)
def test_help_lists_commands_exit_codes_and_env_vars(via: str) -> None:
    """--help documents the commands, the exit codes and the environment variables."""
    result = run("--help", via=via)
    assert result.returncode == 0, result.stderr
    for text in ["schema", "Exit codes", "OUTBOX_LOG_FORMAT", "OUTBOX_LOG_LEVEL"]:
        assert text in result.stdout


@pytest.mark.parametrize(
    ("command", "variables"),
    [
        (["schema", "show"], ["OUTBOX_SCHEMA", "OUTBOX_TABLE_PREFIX"]),
        (
            ["schema", "apply"],
            [
                "OUTBOX_DATABASE_URL",
                "OUTBOX_CONNECT_TIMEOUT",
                "OUTBOX_SCHEMA",
                "OUTBOX_TABLE_PREFIX",
                "OUTBOX_MIGRATION_LOCK_TIMEOUT",
            ],
        ),
        (
            ["schema", "check"],
            [
                "OUTBOX_DATABASE_URL",
                "OUTBOX_CONNECT_TIMEOUT",
                "OUTBOX_SCHEMA",
                "OUTBOX_TABLE_PREFIX",
            ],
        ),
    ],
)
def test_subcommand_help_lists_its_env_vars(command: list[str], variables: list[str]) -> None:
    """Each subcommand's --help names the environment variable of every option."""
    result = invoke(*command, "--help")
    assert result.exit_code == 0, result.output
    for variable in variables:
        assert variable in result.stdout


@pytest.mark.parametrize("via", ENTRY_POINTS)
@pytest.mark.parametrize(
    "env",
    [
        pytest.param({}, id="no-url"),
        pytest.param({"OUTBOX_DATABASE_URL": "postgresql://app:hunter2@127.0.0.1:1/x"}, id="down"),
    ],
)
def test_schema_show_needs_no_database(via: str, env: dict[str, str]) -> None:
    """`schema show` prints the SQL without connecting, whatever the database URL."""
    result = run("schema", "show", via=via, env=env)
    assert result.returncode == 0, result.stderr
    assert 'CREATE TABLE "public"."outbox_events"' in result.stdout
    assert result.stdout == schema.script(OutboxSettings())


@pytest.mark.parametrize(
    ("args", "env"),
    [
        pytest.param(["--schema", "app", "--table-prefix", "ob_"], {}, id="options"),
        pytest.param([], {"OUTBOX_SCHEMA": "app", "OUTBOX_TABLE_PREFIX": "ob_"}, id="env"),
    ],
)
def test_schema_show_follows_schema_and_prefix(args: list[str], env: dict[str, str]) -> None:
    """--schema/--table-prefix (or their variables) change every name in the SQL."""
    result = invoke("schema", "show", *args, env=dict(env))
    assert result.exit_code == 0, result.output
    assert 'CREATE TABLE "app"."ob_events"' in result.stdout
    assert "outbox_events" not in result.stdout
    assert result.stdout == schema.script(OutboxSettings(schema="app", table_prefix="ob_"))


@pytest.mark.parametrize(
    "args",
    [
        ["--schema", "x;drop"],
        ["--schema", "App"],
        ["--table-prefix", "ob'; drop table x; --"],
        ["--table-prefix", "p" * 60],
    ],
)
def test_unsafe_schema_or_prefix_exits_2(args: list[str]) -> None:
    """An invalid identifier is a usage error with one message naming it; no SQL is printed."""
    result = run("schema", "show", *args)
    assert result.returncode == ExitCode.USAGE
    assert result.stdout == ""
    assert result.stderr.startswith("Error: ")
    assert args[1] in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize("via", ENTRY_POINTS)
def test_check_on_empty_database_exits_3(via: str, empty_database_url: str) -> None:
    """`schema check` on a database without the outbox exits 3 and says to run `schema apply`."""
    result = run("schema", "check", "--database-url", empty_database_url, via=via)
    assert result.returncode == ExitCode.SCHEMA_NOT_CURRENT
    assert "outbox-relay schema apply" in result.stderr
    assert result.stdout == ""


@pytest.mark.parametrize("via", ENTRY_POINTS)
def test_apply_then_check_succeed(via: str, empty_database_url: str) -> None:
    """`schema apply` installs the outbox, `schema check` then exits 0."""
    applied = run("schema", "apply", "--database-url", empty_database_url, via=via)
    assert applied.returncode == 0, applied.stderr
    assert f"schema is at version {LATEST}" in applied.stdout
    assert "0001_initial" in applied.stdout
    checked = run("schema", "check", "--database-url", empty_database_url, via=via)
    assert checked.returncode == 0, checked.stderr
    assert f"schema is current (version {LATEST})" in checked.stdout
    assert _recorded_versions(empty_database_url) == [(v, 1) for v in range(1, LATEST + 1)]


def test_apply_twice_says_nothing_applied(database_url: str) -> None:
    """A second `schema apply` exits 0 and reports that nothing was applied."""
    result = run("schema", "apply", "--database-url", database_url)
    assert result.returncode == 0, result.stderr
    assert "nothing applied" in result.stdout
    assert _recorded_versions(database_url) == [(v, 1) for v in range(1, LATEST + 1)]


@pytest.mark.parametrize("form", ["libpq", "sqlalchemy", "postgres"])
def test_env_var_and_url_forms_work(form: str, empty_database_url: str) -> None:
    """OUTBOX_DATABASE_URL works instead of the flag, in every accepted URL spelling."""
    url = {
        "libpq": urls.to_libpq(empty_database_url),
        "sqlalchemy": urls.to_sqlalchemy(empty_database_url),
        "postgres": urls.to_libpq(empty_database_url).replace("postgresql://", "postgres://", 1),
    }[form]
    env = {"OUTBOX_DATABASE_URL": url}
    assert run("schema", "check", env=env).returncode == ExitCode.SCHEMA_NOT_CURRENT
    assert run("schema", "apply", env=env).returncode == 0
    assert run("schema", "check", env=env).returncode == 0
    flag = run("schema", "check", "--database-url", url)
    assert flag.returncode == 0, flag.stderr


def test_check_with_custom_schema_and_prefix(empty_database_url: str) -> None:
    """Applying with --schema/--table-prefix installs that outbox only; check follows suit."""
    custom = ["--database-url", empty_database_url, "--schema", "app", "--table-prefix", "ob_"]
    assert run("schema", "apply", *custom).returncode == 0
    assert run("schema", "check", *custom).returncode == 0
    default = run("schema", "check", "--database-url", empty_database_url)
    assert default.returncode == ExitCode.SCHEMA_NOT_CURRENT


@pytest.mark.parametrize("via", ENTRY_POINTS)
@pytest.mark.parametrize("command", ["check", "apply"])
def test_unreachable_database_exits_4_without_the_password(via: str, command: str) -> None:
    """Nothing listening: exit 4 with one line naming the server, never the password."""
    url = _unreachable_url()
    result = run("schema", command, "--database-url", url, "--connect-timeout", "2", via=via)
    assert result.returncode == ExitCode.DATABASE_UNAVAILABLE
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert "127.0.0.1" in lines[0]
    assert f":{urls.parse(url).port}/shop" in lines[0]
    assert "hunter2" not in result.stderr + result.stdout


def test_password_in_query_is_not_shown_either() -> None:
    """A password given as ?password= is hidden as well."""
    url = f"postgresql://app@127.0.0.1:{testing.free_port()}/shop?password=hunter2"
    result = run("schema", "check", "--database-url", url)
    assert result.returncode == ExitCode.DATABASE_UNAVAILABLE
    assert "hunter2" not in result.stderr + result.stdout


@pytest.mark.parametrize("command", ["check", "apply"])
def test_no_url_exits_2_naming_the_variable(command: str) -> None:
    """Without --database-url or OUTBOX_DATABASE_URL the command says how to give one."""
    result = run("schema", command)
    assert result.returncode == ExitCode.USAGE
    assert "OUTBOX_DATABASE_URL" in result.stderr
    assert len(result.stderr.strip().splitlines()) == 1


@pytest.mark.parametrize(
    "url",
    [
        "mysql://app:hunter2@127.0.0.1/shop",
        "postgresql+asyncpg://app:hunter2@127.0.0.1/shop",
        "app:hunter2@127.0.0.1/shop",
        "postgresql://app:hunter2@127.0.0.1/shop?no_such_option=1",
    ],
)
def test_bad_url_exits_2(url: str) -> None:
    """An unsupported scheme or unparseable URL is a usage error, without the password."""
    result = run("schema", "check", "--database-url", url)
    assert result.returncode == ExitCode.USAGE
    assert result.stderr.startswith("Error: ")
    assert len(result.stderr.strip().splitlines()) == 1
    assert "hunter2" not in result.stderr + result.stdout


def test_concurrent_apply_processes_both_succeed(empty_database_url: str) -> None:
    """Two `schema apply` processes at once both exit 0 and migration 1 is recorded once."""
    command = [*ENTRY_POINTS["module"], "schema", "apply", "--database-url", empty_database_url]
    procs = [
        subprocess.Popen(command, env=_env(), stdout=subprocess.PIPE, stderr=subprocess.PIPE)
        for _ in range(2)
    ]
    outputs = [proc.communicate(timeout=60) for proc in procs]
    assert [proc.returncode for proc in procs] == [0, 0], outputs
    stdout = [out.decode() for out, _ in outputs]
    assert sorted("nothing applied" in out for out in stdout) == [False, True], stdout
    assert any("applied 0001_initial" in out for out in stdout), stdout
    assert _recorded_versions(empty_database_url) == [(v, 1) for v in range(1, LATEST + 1)]


@pytest.mark.parametrize("via", ENTRY_POINTS)
def test_misspelt_kafka_setting_exits_2_in_one_line(via: str) -> None:
    """Issue 29: `run --kafka-config security.protocl=SASL_SSL` printed a 34-line traceback and
    exited 1. It is one line naming the property, exit 2, before anything is reached (neither
    address here answers)."""
    result = run(
        "run",
        "--database-url",
        _unreachable_url(),
        "--kafka-bootstrap-servers",
        f"127.0.0.1:{testing.free_port()}",
        "--kafka-config",
        "security.protocl=SASL_SSL",
        via=via,
    )
    assert result.returncode == ExitCode.USAGE, result.stderr
    lines = result.stderr.strip().splitlines()
    assert len(lines) == 1, result.stderr
    assert lines[0].startswith("Error: --kafka-config security.protocl "), lines
    assert "Traceback" not in result.stderr
