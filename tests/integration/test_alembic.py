"""``outbox.alembic``: the outbox's migrations inside a real Alembic revision history.

Each test builds an Alembic project in a temporary directory (``env.py`` and a revision that
calls ``outbox.alembic.upgrade``), and runs Alembic's own commands against a fresh database.
"""

from __future__ import annotations

import textwrap
from pathlib import Path

import psycopg
import pytest
from alembic import command
from alembic.config import Config

import outbox
from outbox import migrator, schema, urls
from outbox.errors import OutboxError, SchemaOutdatedError, TransactionRequiredError
from outbox.settings import OutboxSettings

DEFAULT = OutboxSettings()
LATEST = schema.latest_version()

ENV_PY = """
from alembic import context
from sqlalchemy import create_engine

url = context.config.get_main_option("sqlalchemy.url")
if context.is_offline_mode():
    context.configure(url=url, literal_binds=True)
    with context.begin_transaction():
        context.run_migrations()
else:
    engine = create_engine(url)
    try:
        with engine.connect() as connection:
            context.configure(connection=connection, transactional_ddl=True)
            with context.begin_transaction():
                context.run_migrations()
    finally:
        engine.dispose()
"""

REVISION = """
from alembic import op

import outbox.alembic

revision = {revision!r}
down_revision = {down!r}

def upgrade():
    {upgrade}

def downgrade():
    {downgrade}
"""

ORDERS = (
    "op.create_table('orders', sa.Column('id', sa.Integer, primary_key=True))",
    "op.drop_table('orders')",
)


def alembic_project(tmp_path: Path, database_url: str, revisions: list[tuple[str, str]]) -> Config:
    """An Alembic project whose revisions run the given (upgrade, downgrade) bodies in order."""
    (tmp_path / "versions").mkdir()
    (tmp_path / "env.py").write_text(ENV_PY)
    (tmp_path / "script.py.mako").write_text("")
    down = None
    for number, (up_body, down_body) in enumerate(revisions, start=1):
        revision = f"r{number}"
        text = REVISION.format(revision=revision, down=down, upgrade=up_body, downgrade=down_body)
        (tmp_path / "versions" / f"{revision}.py").write_text(
            "import sqlalchemy as sa\n" + textwrap.dedent(text)
        )
        down = revision
    config = Config()
    config.set_main_option("script_location", str(tmp_path))
    # ConfigParser interpolates %: a socket path in the URL is %-encoded.
    config.set_main_option("sqlalchemy.url", urls.to_sqlalchemy(database_url).replace("%", "%%"))
    return config


OUTBOX = ("outbox.alembic.upgrade(op)", "outbox.alembic.downgrade(op)")


def recorded(url: str) -> list[int]:
    with psycopg.connect(url) as conn:
        rows = conn.execute("SELECT version FROM outbox_schema_migrations ORDER BY 1").fetchall()
    return [r[0] for r in rows]


def test_an_empty_database_gets_the_outbox_and_schema_check_passes(
    tmp_path: Path, empty_database_url: str
) -> None:
    """``alembic upgrade head`` from nothing: the outbox is current, recorded in its own table
    as ``schema apply`` records it, and writable in the same database as the app's tables."""
    config = alembic_project(tmp_path, empty_database_url, [ORDERS, OUTBOX])
    with psycopg.connect(empty_database_url) as conn, pytest.raises(outbox.SchemaMissingError):
        migrator.require_current(conn, DEFAULT)
    command.upgrade(config, "head")
    with psycopg.connect(empty_database_url) as conn:
        assert migrator.require_current(conn, DEFAULT).applied == tuple(range(1, LATEST + 1))
        conn.execute("INSERT INTO orders (id) VALUES (1)")
        outbox.add(conn, "orders", {"id": 1}, key="1")
        assert conn.execute("SELECT version_num FROM alembic_version").fetchone() == ("r2",)
    assert recorded(empty_database_url) == list(range(1, LATEST + 1))


def test_a_database_at_an_older_migration_gets_the_rest_and_keeps_its_rows(
    tmp_path: Path, empty_database_url: str
) -> None:
    """A database the CLI installed at migration 3, with an event waiting: Alembic applies the
    later migrations only, and the event is still there to be relayed."""
    url = empty_database_url
    with psycopg.connect(url) as conn:
        for statement in schema.bootstrap_statements(DEFAULT):
            conn.execute(statement)
        for migration in schema.all_migrations()[:3]:
            conn.execute(migration.render(DEFAULT))
            conn.execute(schema.record_statement(DEFAULT, migration))
    with psycopg.connect(url) as conn:
        event_id = outbox.add(conn, "orders", {"id": 7}, key="7")
        with pytest.raises(SchemaOutdatedError):
            migrator.require_current(conn, DEFAULT)
    command.upgrade(alembic_project(tmp_path, url, [OUTBOX]), "head")
    with psycopg.connect(url) as conn:
        migrator.require_current(conn, DEFAULT)
        rows = conn.execute("SELECT event_id FROM outbox_events").fetchall()
    assert rows == [(event_id,)]
    assert recorded(url) == list(range(1, LATEST + 1))


def test_a_later_revision_applies_only_what_is_pending_and_downgrade_keeps_the_outbox(
    tmp_path: Path, empty_database_url: str
) -> None:
    """A second outbox revision (what a team adds when a new version ships migrations) finds
    nothing to do; downgrading to base drops the app's table but keeps the outbox and its
    events, and upgrading again works."""
    url = empty_database_url
    config = alembic_project(tmp_path, url, [OUTBOX, ORDERS, OUTBOX])
    command.upgrade(config, "head")
    with psycopg.connect(url) as conn:
        event_id = outbox.add(conn, "orders", {"id": 1}, key="1")
    command.downgrade(config, "base")
    with psycopg.connect(url) as conn:
        assert conn.execute("SELECT to_regclass('orders')").fetchone() == (None,)
        assert conn.execute("SELECT event_id FROM outbox_events").fetchall() == [(event_id,)]
        migrator.require_current(conn, DEFAULT)
    command.upgrade(config, "head")
    assert recorded(url) == list(range(1, LATEST + 1))


def test_a_failing_revision_rolls_the_outbox_back_with_it(
    tmp_path: Path, empty_database_url: str
) -> None:
    """The outbox's migrations run in the revision's transaction: when a later statement of
    the same revision fails, nothing of the outbox remains."""
    failing = ("outbox.alembic.upgrade(op)\n    op.execute('SELECT no_such_function()')", "pass")
    config = alembic_project(tmp_path, empty_database_url, [failing])
    with pytest.raises(Exception, match="no_such_function"):
        command.upgrade(config, "head")
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT to_regclass('outbox_events')").fetchone() == (None,)


def test_settings_choose_the_schema_and_prefix(tmp_path: Path, empty_database_url: str) -> None:
    """``upgrade(op, settings)`` installs the outbox where those settings put it."""
    body = (
        "outbox.alembic.upgrade(op, outbox.OutboxSettings(schema='events', table_prefix='shop_'))",
        "pass",
    )
    command.upgrade(alembic_project(tmp_path, empty_database_url, [body]), "head")
    with psycopg.connect(empty_database_url) as conn:
        migrator.require_current(conn, OutboxSettings(schema="events", table_prefix="shop_"))
        assert conn.execute("SELECT to_regclass('outbox_events')").fetchone() == (None,)


def test_offline_mode_is_refused_with_what_to_do_instead(
    tmp_path: Path, empty_database_url: str
) -> None:
    """``alembic upgrade --sql`` cannot know what is pending: a clear error naming the way."""
    config = alembic_project(tmp_path, empty_database_url, [OUTBOX])
    with pytest.raises(OutboxError, match=r"offline mode.*outbox-relay schema show"):
        command.upgrade(config, "head", sql=True)


def test_autocommit_is_refused(tmp_path: Path, empty_database_url: str) -> None:
    """An env.py that runs revisions in autocommit would commit each outbox migration apart
    from the revision: refused before anything is written."""
    config = alembic_project(tmp_path, empty_database_url, [OUTBOX])
    env = (tmp_path / "env.py").read_text()
    (tmp_path / "env.py").write_text(
        env.replace("create_engine(url)", "create_engine(url, isolation_level='AUTOCOMMIT')")
    )
    with pytest.raises(TransactionRequiredError):
        command.upgrade(config, "head")
    with psycopg.connect(empty_database_url) as conn:
        assert conn.execute("SELECT to_regclass('outbox_events')").fetchone() == (None,)
