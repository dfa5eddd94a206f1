"""Which outboxes the operator's commands act on (``--outboxes``, ``--outbox``), and how
``status`` sums up several; no server: what would connect is never reached."""

from __future__ import annotations

import os
from pathlib import Path

import click
import pytest
from click.testing import CliRunner

from outbox.errors import ConfigurationError
from outbox.settings import OutboxSettings
from outbox_relay import status
from outbox_relay.cli import cli
from outbox_relay.cli.common import Where
from outbox_relay.exit_codes import ExitCode

LIST = """
[[outbox]]
name = "orders"
database_url = "postgresql://app@127.0.0.1:1/orders"

[[outbox]]
name = "payments"
database_url = "postgresql://app@127.0.0.1:1/payments"
schema = "pay"
retention = "1h"
"""


@pytest.fixture
def listed(tmp_path: Path) -> str:
    path = tmp_path / "outboxes.toml"
    path.write_text(LIST)
    return str(path)


def test_a_list_alone_names_every_outbox(listed: str) -> None:
    where = Where(outboxes_file=listed)
    assert where.every_listed
    assert [(e.name, e.location.schema, e.retention) for e in where.outboxes()] == [
        ("orders", "public", None),
        ("payments", "pay", 3600.0),
    ]


def test_outbox_picks_one_of_the_list(listed: str) -> None:
    where = Where(outboxes_file=listed, outbox_name="payments")
    assert not where.every_listed
    assert where.outbox().database_url.endswith("/payments")


def test_a_database_url_is_one_outbox_named_after_its_database() -> None:
    """As `run` names it (outboxes.from_urls): the database, and the schema when not public."""
    where = Where(database_url="postgresql://app@h/shop", schema_name="sales")
    entry = where.outbox()
    assert (entry.name, entry.location) == ("shop.sales", OutboxSettings(schema="sales"))


def test_a_database_whose_name_run_refuses_is_still_one_outbox() -> None:
    """`run` refuses an outbox named _legacy; status and the others only show the name."""
    assert Where(database_url="postgresql://app@h/_legacy").outbox().name == "_legacy"
    with pytest.raises(ConfigurationError, match="no database URL given"):
        Where().outbox()


def test_a_command_on_one_outbox_needs_outbox_with_a_list(listed: str) -> None:
    with pytest.raises(click.UsageError, match=r"pass --outbox NAME \(the list has: orders, pay"):
        Where(outboxes_file=listed).outbox()


def test_an_unknown_name_is_refused_naming_the_list(listed: str) -> None:
    with pytest.raises(ConfigurationError, match="its outboxes: orders, payments"):
        Where(outboxes_file=listed, outbox_name="nope").outbox()


def test_outbox_without_a_list_is_refused() -> None:
    with pytest.raises(click.UsageError, match="pass --outboxes FILE too"):
        Where(database_url="postgresql://app@h/shop", outbox_name="shop").outboxes()


def test_a_list_and_a_database_url_are_refused(listed: str) -> None:
    with pytest.raises(click.UsageError, match=r"either --outboxes .* or --database-url"):
        Where(database_url="postgresql://app@h/shop", outboxes_file=listed).outboxes()


def invoke(*args: str) -> click.testing.Result:
    unset: dict[str, str | None] = {k: None for k in os.environ if k.startswith("OUTBOX_")}
    return CliRunner().invoke(cli, list(args), env=unset)


@pytest.mark.parametrize(
    "command", [["status"], ["dead-letters", "list"], ["replay", "--since", "1h"]]
)
@pytest.mark.parametrize(
    ("args", "message"),
    [
        (["--schema", "pay"], "--schema cannot be used with --outboxes"),
        (["--table-prefix", "x_"], "--table-prefix cannot be used with --outboxes"),
        (["--database-url", "postgresql://h/d"], "not both"),
        (["--outbox", "nope"], "no outbox named 'nope'"),
    ],
)
def test_bad_combinations_exit_2_before_connecting(
    listed: str, command: list[str], args: list[str], message: str
) -> None:
    result = invoke(*command, "--outboxes", listed, *args)
    assert result.exit_code == 2, result.output
    assert message in result.output


def test_a_missing_list_exits_2_naming_it(tmp_path: Path) -> None:
    result = invoke("status", "--outboxes", str(tmp_path / "none.toml"))
    assert result.exit_code == 2
    assert "cannot read the outbox list" in result.output


def figures(backlog: int) -> status.Status:
    return status.Status(backlog, None, 0, 0, 0, None, None)


def test_the_worst_exit_code_puts_what_could_not_be_read_before_lag() -> None:
    def reports(*codes: ExitCode) -> list[status.Report]:
        return [status.Report(f"o{n}", code=code) for n, code in enumerate(codes)]

    assert status.worst(reports()) == ExitCode.OK
    assert status.worst(reports(ExitCode.OK, ExitCode.LAGGING)) == ExitCode.LAGGING
    assert status.worst(reports(ExitCode.LAGGING, ExitCode.SCHEMA_NOT_CURRENT)) == 3
    assert status.worst(reports(ExitCode.SCHEMA_NOT_CURRENT, ExitCode.DATABASE_UNAVAILABLE)) == 4
    assert status.worst(reports(ExitCode.DATABASE_UNAVAILABLE, ExitCode.FAILURE)) == 1


def test_a_report_is_the_status_named_or_the_error_named() -> None:
    read = status.Report("orders", "db", figures(3))
    assert read.as_json() == {"outbox": "orders", **figures(3).as_json()}
    failed = status.Report("gone", "db", error="cannot connect", code=ExitCode.DATABASE_UNAVAILABLE)
    assert failed.as_json() == {"outbox": "gone", "error": "cannot connect"}


def test_each_outbox_has_a_block_headed_by_its_name() -> None:
    text = status.render_all(
        [
            status.Report("orders", "db1", figures(3), problem="too old"),
            status.Report("gone", "db2", error="cannot connect"),
        ]
    )
    orders, gone = text.split("\n\n== ")
    assert orders.startswith("== orders: db1 ==\nbacklog (unpublished)          3\n")
    assert orders.endswith("\norders: too old")
    assert gone == "gone: db2 ==\ngone: cannot connect"
