"""One way to name the outbox's objects in SQL built in Python: ``OutboxSettings.sql``."""

from __future__ import annotations

import re
from pathlib import Path

import pytest
from psycopg import sql as pg_sql

import outbox
import outbox_relay
from outbox.settings import OutboxSettings, render_sql

PACKAGES = [outbox, outbox_relay]
ROOT = Path(outbox.__file__).parent.parent

#: The ways table names reached SQL before ``OutboxSettings.sql``: a placeholder replaced by
#: hand, ``str.format`` on a SQL template, and a quoted name interpolated by an f-string.
OLD_IDIOMS = {
    "str.replace of a placeholder": re.compile(r"""\.replace\(\s*["']\{"""),
    "str.format of a SQL template": re.compile(r"\b_[A-Z][A-Z0-9_]*\.format\("),
    "str.format of a table name": re.compile(r"\.format\(\s*(events|table|last_id|log)\s*="),
    "f-string of a quoted name": re.compile(
        r"\{[^{}\n]*\b(events_table|dedup_table|migrations_table|qualified\(|quote_identifier)"
    ),
    "f-string of a table": re.compile(
        r"""\bf("|'|\"\"\")[^\n]*\b(FROM|INTO|UPDATE|JOIN|TABLE|EXISTS)\s+\{(?!\{)"""
    ),
}
#: Files allowed an idiom, with the reason.
ALLOWED = {
    "outbox/testing.py": "creates and drops test databases, which are not outbox objects",
    "outbox/apache_kafka.py": "formats a Maven pom.xml, not SQL",
}


def test_names_are_quoted_and_schema_qualified() -> None:
    """Both parts are quoted, so reserved words are safe; the prefix is part of the name."""
    settings = OutboxSettings(schema="order", table_prefix="x_")
    assert settings.identifier("events") == pg_sql.Identifier("order", "x_events")
    assert settings.identifier("events_pkey", qualified=False) == pg_sql.Identifier("x_events_pkey")
    assert settings.sql("SELECT 1 FROM {t}", t="events") == 'SELECT 1 FROM "order"."x_events"'
    assert settings.qualified("last_id") == '"order"."x_last_id"'


def test_the_quoting_keeps_case_and_escapes_quotes() -> None:
    """The helper's quoting is psycopg's: a schema "Billing" stays "Billing", not billing."""
    billing = pg_sql.Identifier("Billing", "x_events")
    assert render_sql("SELECT 1 FROM {t}", t=billing) == 'SELECT 1 FROM "Billing"."x_events"'
    odd = pg_sql.Identifier('we"ird', "x_events")
    assert render_sql("SELECT 1 FROM {t}", t=odd) == 'SELECT 1 FROM "we""ird"."x_events"'


def test_settings_still_refuse_names_that_need_more_than_quoting() -> None:
    """OutboxSettings itself accepts only lower-case names, as before: "Billing" is refused."""
    with pytest.raises(outbox.InvalidIdentifierError):
        OutboxSettings(schema="Billing")


def test_fragments_pass_through_and_literal_braces_are_doubled() -> None:
    """A psycopg Composable is inserted as it is; ``{{}}`` is a literal ``{}``; %s stays."""
    settings = OutboxSettings()
    sql = settings.sql(
        "SELECT '{{}}'::int[], %s FROM {events} WHERE {where}",
        events="events",
        where=pg_sql.SQL("id = %(id)s"),
    )
    assert sql == 'SELECT \'{}\'::int[], %s FROM "public"."outbox_events" WHERE id = %(id)s'


def test_an_undoubled_brace_is_refused() -> None:
    """A literal brace left single would be a field: it fails when the statement is built."""
    with pytest.raises((KeyError, ValueError, IndexError)):
        OutboxSettings().sql("SELECT '{}'::int[] FROM {events}", events="events")


@pytest.mark.parametrize("idiom", OLD_IDIOMS)
def test_old_ways_of_naming_tables_do_not_come_back(idiom: str) -> None:
    """SQL names the outbox's objects through ``OutboxSettings.sql`` only."""
    offenders = {
        str(path.relative_to(ROOT))
        for package in PACKAGES
        for path in Path(package.__path__[0]).rglob("*.py")
        if OLD_IDIOMS[idiom].search(path.read_text())
    }
    assert offenders <= set(ALLOWED)
