"""The operator's commands over a list of outboxes (``--outboxes FILE``, ``--outbox NAME``).

Real PostgreSQL, no broker: each outbox is a database of its own on the suite's server, one of
them at another schema and prefix; the commands run as subprocesses.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import psycopg
import pytest

import outbox
from outbox import schema, testing, urls
from outbox.settings import OutboxSettings

CLI = [sys.executable, "-m", "outbox_relay"]
ELSEWHERE = OutboxSettings(schema="pay", table_prefix="ob_")


def cli(*args: str, env: dict[str, str] | None = None) -> subprocess.CompletedProcess[str]:
    """``outbox-relay ARGS`` with no OUTBOX_* variable but ``env``'s."""
    clean = {k: v for k, v in os.environ.items() if not k.startswith("OUTBOX_")}
    return subprocess.run(
        [*CLI, *args],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
        env={**clean, **(env or {})},
    )


@dataclass(frozen=True)
class Fleet:
    """The list file and the databases it names."""

    file: Path
    orders: str
    payments: str
    empty: str
    gone: str

    def list_args(self, *names: str) -> list[str]:
        return ["--outboxes", str(self.file), *(a for n in names for a in ("--outbox", n))]


def write_list(path: Path, entries: list[tuple[str, str, OutboxSettings, str | None]]) -> Path:
    tables = []
    for name, url, location, retention in entries:
        table = [
            "[[outbox]]",
            f'name = "{name}"',
            f'database_url = "{url}"',
            f'schema = "{location.schema}"',
            f'table_prefix = "{location.table_prefix}"',
        ]
        tables.append("\n".join(table + ([f'retention = "{retention}"'] if retention else [])))
    path.write_text("\n\n".join(tables) + "\n")
    return path


@pytest.fixture
def fleet(pg_server: str, template_database: str, tmp_path: Path) -> Iterator[Fleet]:
    """Four outboxes: ``orders`` (the default location), ``payments`` (schema pay, prefix ob_,
    retention 1h in the list), ``empty`` (a database without the schema) and ``gone`` (a
    database that does not exist)."""
    names = {role: testing.unique_name(f"outbox_{role}") for role in ("orders", "pay", "empty")}
    orders = testing.create_database(pg_server, names["orders"], template=template_database)
    payments = testing.create_database(pg_server, names["pay"])
    testing.apply_migrations_up_to(payments, len(schema.all_migrations()), ELSEWHERE)
    empty = testing.create_database(pg_server, names["empty"])
    gone = urls.with_database(pg_server, testing.unique_name("outbox_gone"))
    listed = [
        ("orders", orders, OutboxSettings(), None),
        ("payments", payments, ELSEWHERE, "1h"),
        ("empty", empty, OutboxSettings(), None),
        ("gone", gone, OutboxSettings(), None),
    ]
    try:
        yield Fleet(write_list(tmp_path / "outboxes.toml", listed), orders, payments, empty, gone)
    finally:
        for name in names.values():
            testing.drop_database(pg_server, name)


def write(database_url: str, location: OutboxSettings, count: int, topic: str = "t") -> None:
    with psycopg.connect(database_url) as conn:
        events = [outbox.Event(topic, {"n": n}, key=f"k{n}") for n in range(count)]
        outbox.Outbox(location).add_many(conn, events)


def sql(database_url: str, statement: str) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(statement)
        rows = cursor.fetchall() if cursor.description else []
        conn.commit()
    return rows


def test_status_reports_every_outbox_of_the_list(fleet: Fleet) -> None:
    """`status --outboxes` alone shows each outbox in the list's order; the outbox without the
    schema and the one that does not exist say why and do not stop the others; the exit code
    is the worst (the unreachable database, 4)."""
    write(fleet.orders, OutboxSettings(), 3)
    write(fleet.payments, ELSEWHERE, 1)
    result = cli("status", *fleet.list_args(), "--json")
    assert result.returncode == 4, result.stderr
    reports = json.loads(result.stdout)["outboxes"]
    assert [r["outbox"] for r in reports] == ["orders", "payments", "empty", "gone"]
    orders, payments, empty, gone = reports
    assert (orders["backlog"], payments["backlog"]) == (3, 1)
    assert "error" not in orders
    assert "error" not in payments
    assert set(orders) == set(payments)
    assert set(empty) == set(gone) == {"outbox", "error"}
    assert empty["error"].startswith("the outbox schema is not installed")
    assert gone["error"].startswith("cannot connect to PostgreSQL at")
    assert result.stderr.splitlines() == [
        f"Error: empty: {empty['error']}",
        f"Error: gone: {gone['error']}",
    ]
    table = cli("status", *fleet.list_args())
    assert table.returncode == 4
    blocks = table.stdout.split("\n\n== ")
    assert [b.removeprefix("== ").split(":")[0] for b in blocks] == [
        "orders",
        "payments",
        "empty",
        "gone",
    ]
    assert "backlog (unpublished)          3" in blocks[0]
    assert "backlog (unpublished)          1" in blocks[1]
    assert blocks[2].splitlines()[1] == f"empty: {empty['error']}"
    assert blocks[3].splitlines()[1].startswith("gone: cannot connect to PostgreSQL at")


def test_the_exit_code_is_the_worst_of_the_outboxes(fleet: Fleet, tmp_path: Path) -> None:
    """A missing schema alone exits 3; with every outbox readable, --max-lag decides (6 when
    one outbox lags, naming it); an outbox's retention in the list stands for --retention."""
    write(fleet.payments, ELSEWHERE, 1)
    no_schema = write_list(
        tmp_path / "no-schema.toml",
        [
            ("orders", fleet.orders, OutboxSettings(), None),
            ("empty", fleet.empty, OutboxSettings(), None),
        ],
    )
    assert cli("status", "--outboxes", str(no_schema)).returncode == 3
    readable = write_list(
        tmp_path / "readable.toml",
        [
            ("orders", fleet.orders, OutboxSettings(), None),
            ("payments", fleet.payments, ELSEWHERE, "1h"),
        ],
    )
    fine = cli("status", "--outboxes", str(readable), "--json", "--max-lag", "1h")
    assert (fine.returncode, fine.stderr) == (0, "")
    orders, payments = json.loads(fine.stdout)["outboxes"]
    assert orders["published_last_minute"] is None  # deleted on publish: --retention 0
    assert payments["published_last_minute"] == 0  # kept: the list says 1h
    lagging = cli("status", "--outboxes", str(readable), "--max-lag", "0")
    assert lagging.returncode == 6
    assert lagging.stderr.startswith("Error: payments: the oldest unpublished event is")
    assert "(--max-lag 0)" in lagging.stderr
    assert "orders" not in lagging.stderr


def test_outbox_picks_one_outbox_of_the_list(fleet: Fleet) -> None:
    """With --outbox, status reports that outbox as it reports a --database-url one (plus its
    name); one that cannot be read fails as a single outbox does; an unknown name exits 2
    listing the names."""
    write(fleet.payments, ELSEWHERE, 2)
    picked = cli("status", *fleet.list_args("payments"), "--json")
    assert picked.returncode == 0, picked.stderr
    found = json.loads(picked.stdout)
    single = json.loads(cli("status", "--database-url", fleet.orders, "--json").stdout)
    assert set(found) == set(single)
    assert (found["outbox"], found["backlog"]) == ("payments", 2)
    assert single["outbox"] == urls.parse(fleet.orders).database
    by_variable = cli("status", "--json", env={"OUTBOX_OUTBOXES": str(fleet.file),
                                               "OUTBOX_OUTBOX_NAME": "payments"})  # fmt: skip
    assert (json.loads(by_variable.stdout)["outbox"], by_variable.returncode) == ("payments", 0)
    gone = cli("status", *fleet.list_args("gone"))
    assert gone.returncode == 4
    assert gone.stderr.startswith("Error: cannot connect to PostgreSQL at")
    unknown = cli("status", *fleet.list_args("nope"))
    assert unknown.returncode == 2
    assert "no outbox named 'nope' in the list (its outboxes: orders, payments, empty, gone)" in (
        unknown.stderr
    )


def dead_letter(database_url: str, location: OutboxSettings) -> int:
    """One dead-lettered event in that outbox; its row id."""
    write(database_url, location, 1, topic="dead")
    [(row,)] = sql(
        database_url,
        f"UPDATE {location.events_table} SET attempts = 3, last_error = 'boom',"
        " dead_lettered_at = now() RETURNING id",
    )
    assert isinstance(row, int)
    return row


def dead_lettered(database_url: str, location: OutboxSettings) -> int:
    [(count,)] = sql(
        database_url,
        f"SELECT count(*) FROM {location.events_table} WHERE dead_lettered_at IS NOT NULL",
    )
    assert isinstance(count, int)
    return count


def test_dead_letters_act_on_the_named_outbox_only(fleet: Fleet) -> None:
    """`dead-letters list`, `retry` and `discard` with a list need --outbox, and then touch
    that outbox alone: a retry in one leaves the other's dead letter as it was."""
    orders_row = dead_letter(fleet.orders, OutboxSettings())
    payments_row = dead_letter(fleet.payments, ELSEWHERE)
    for args in (["list"], ["retry", "--all"], ["discard", "--id", "1", "--reason", "x"]):
        refused = cli("dead-letters", *args, *fleet.list_args())
        assert refused.returncode == 2
        assert "pass --outbox NAME (the list has: orders, payments, empty, gone)" in refused.stderr
    listed = cli("dead-letters", "list", *fleet.list_args("payments"), "--json")
    assert listed.returncode == 0, listed.stderr
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [payments_row]
    retried = cli(
        "dead-letters", "retry", "--all", "--reason", "fixed",
        env={"OUTBOX_OUTBOXES": str(fleet.file), "OUTBOX_OUTBOX_NAME": "orders"},
    )  # fmt: skip
    assert retried.returncode == 0, retried.stderr
    assert f"rows {orders_row}" in retried.stdout
    assert dead_lettered(fleet.orders, OutboxSettings()) == 0
    assert dead_lettered(fleet.payments, ELSEWHERE) == 1
    discarded = cli(
        "dead-letters", "discard", *fleet.list_args("payments"), "--id", str(payments_row),
        "--reason", "test",
    )  # fmt: skip
    assert discarded.returncode == 0, discarded.stderr
    assert sql(fleet.payments, "SELECT count(*) FROM pay.ob_events") == [(0,)]
    assert sql(fleet.orders, "SELECT count(*) FROM outbox_events") == [(1,)]


def test_replay_acts_on_the_named_outbox_only(fleet: Fleet) -> None:
    """`replay` with a list needs --outbox; it puts back the published rows of that outbox, and
    the other outbox's stay published."""
    for url, location in ((fleet.orders, OutboxSettings()), (fleet.payments, ELSEWHERE)):
        write(url, location, 2)
        sql(url, f"UPDATE {location.events_table} SET published_at = now()")
    refused = cli("replay", *fleet.list_args(), "--since", "1h")
    assert refused.returncode == 2
    assert "pass --outbox NAME (the list has: orders, payments, empty, gone)" in refused.stderr
    replayed = cli("replay", *fleet.list_args("payments"), "--since", "1h")
    assert replayed.returncode == 0, replayed.stderr
    assert replayed.stdout.startswith("replaying 2 event(s)")
    unpublished = "SELECT count(*) FROM {} WHERE published_at IS NULL"
    assert sql(fleet.payments, unpublished.format(ELSEWHERE.events_table)) == [(2,)]
    assert sql(fleet.orders, unpublished.format("outbox_events")) == [(0,)]


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (
            ["--database-url", "postgresql://app@127.0.0.1:1/shop"],
            "give either --outboxes (a list of outboxes) or --database-url (one outbox), not both",
        ),
        (["--schema", "pay"], "--schema cannot be used with --outboxes"),
    ],
)
def test_a_list_with_one_outbox_options_is_refused(
    fleet: Fleet, args: list[str], message: str
) -> None:
    """--outboxes beside --database-url (or --schema) exits 2 before anything connects."""
    for command in (["status"], ["dead-letters", "list"], ["replay", "--since", "1h"]):
        result = cli(*command, *fleet.list_args("orders"), *args)
        assert result.returncode == 2
        assert message in result.stderr
