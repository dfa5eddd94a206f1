"""The outbox list: what --outboxes files and repeated --database-url mean, and their errors."""

from __future__ import annotations

from pathlib import Path

import pytest

from outbox.errors import ConfigurationError
from outbox.settings import OutboxSettings
from outbox_relay import outboxes
from outbox_relay.config import RelaySettings

URL = "postgresql://relay@db1/orders"


def test_an_entry_with_every_key() -> None:
    (entry,) = outboxes.parse(
        """
        [[outbox]]
        name = "orders"
        database_url = "postgresql://relay:${PW}@db1/orders"
        schema = "sales"
        table_prefix = "ob_"
        relays = 2
        retention = "7d"
        """,
        environ={"PW": "s3cret"},
    )
    assert entry.name == "orders"
    assert entry.database_url == "postgresql://relay:s3cret@db1/orders"
    assert entry.location == OutboxSettings(schema="sales", table_prefix="ob_")
    assert (entry.relays, entry.retention) == (2, 7 * 86400)
    assert "s3cret" not in entry.where


def test_defaults_and_the_settings_of_an_entry() -> None:
    (entry,) = outboxes.parse(f'[[outbox]]\nname = "a"\ndatabase_url = "{URL}"\n')
    assert (entry.location, entry.relays, entry.retention) == (OutboxSettings(), 1, None)
    base = RelaySettings(database_url="postgresql://x/y", kafka_bootstrap_servers="k:9092")
    served = entry.settings(base)
    assert (served.database_url, served.retention) == (URL, 0.0)
    kept = outboxes.OutboxEntry("b", URL, retention=60.0).settings(base)
    assert kept.retention == 60.0


@pytest.mark.parametrize(
    ("text", "message"),
    [
        ("[[outbox]]\nname = 'a'\n", "database_url is missing"),
        (f"[[outbox]]\nname = 'a b'\ndatabase_url = '{URL}'\n", "outbox name 'a b'"),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{URL}'\nrelay = 2\n", "unknown key(s) relay"),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{URL}'\nrelays = 0\n", "relays must be"),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{URL}'\nretention = 'x'\n", "retention 'x'"),
        ("[[outbox]]\nname = 'a'\ndatabase_url = 'mysql://h/d'\n", "not supported"),
        ("[[outbox]]\nname = 'a'\ndatabase_url = 'postgresql://${NOPE}@h/d'\n", "${NOPE}, unset"),
        (f"[[outbox]]\nname = 'a'\ndatabase_url = '{URL}'\nschema = 'Bad'\n", "schema 'Bad'"),
        ("outbox = 3\n", "[[outbox]] tables"),
        ("[outboxes]\n", "unknown key(s) outboxes"),
        ("[[outbox]\n", "not valid TOML"),
        (
            f"[[outbox]]\nname = 'a'\ndatabase_url = '{URL}'\n"
            f"[[outbox]]\nname = 'a'\ndatabase_url = 'postgresql://h/other'\n",
            "two outboxes are named 'a'",
        ),
        (
            f"[[outbox]]\nname = 'a'\ndatabase_url = '{URL}'\n"
            f"[[outbox]]\nname = 'b'\ndatabase_url = '{URL}'\n",
            "are the same outbox",
        ),
    ],
)
def test_a_wrong_list_names_what_is_wrong(text: str, message: str) -> None:
    with pytest.raises(ConfigurationError) as caught:
        outboxes.parse(text, environ={})
    assert message in str(caught.value)


def test_urls_are_named_after_their_database() -> None:
    entries = outboxes.from_urls(
        ["postgresql://h/orders", "postgresql://h/billing"], OutboxSettings()
    )
    assert [e.name for e in entries] == ["orders", "billing"]
    moved = outboxes.from_urls(["postgresql://h/orders"], OutboxSettings("sales", "ob_"))
    assert moved[0].name == "orders.sales.ob"


def test_two_urls_of_one_database_name_ask_for_a_list() -> None:
    with pytest.raises(ConfigurationError, match="--outboxes file"):
        outboxes.from_urls(["postgresql://h1/app", "postgresql://h2/app"], OutboxSettings())


def test_the_file_is_read_again_only_when_it_changed(tmp_path: Path) -> None:
    path = tmp_path / "outboxes.toml"
    path.write_text(f"[[outbox]]\nname = 'a'\ndatabase_url = '{URL}'\n")
    file = outboxes.OutboxFile(path)
    assert [e.name for e in file.read()] == ["a"]
    assert not file.changed()
    path.write_text(
        path.read_text() + "[[outbox]]\nname = 'b'\ndatabase_url = 'postgresql://h/b'\n"
    )
    assert file.changed()
    assert [e.name for e in file.read()] == ["a", "b"]
    path.unlink()
    assert file.changed()
    with pytest.raises(ConfigurationError, match="cannot read the outbox list"):
        file.read()


def test_find_lists_the_names_it_knows() -> None:
    entries = outboxes.from_urls(
        ["postgresql://h/orders", "postgresql://h/billing"], OutboxSettings()
    )
    assert outboxes.find(entries, "billing").name == "billing"
    with pytest.raises(ConfigurationError, match="its outboxes: orders, billing"):
        outboxes.find(entries, "nope")
