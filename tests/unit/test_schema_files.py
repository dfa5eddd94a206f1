"""The migration files shipped in the package and the SQL rendered from them (no database)."""

from __future__ import annotations

import hashlib
import re
from importlib import resources

import pytest

from outbox import schema
from outbox.settings import MAX_IDENTIFIER_LENGTH, OutboxSettings

#: Checksums of released migrations. Applied migrations must never change (databases record
#: these values), so editing a released file must fail here: add a new migration instead.
RELEASED_CHECKSUMS = {
    1: "d0d3fcd6c337b10a34f9253622deee0923cb961fdea71d8c896f4cca6500ae51",
}

SETTINGS = [
    pytest.param(OutboxSettings(), id="default"),
    pytest.param(OutboxSettings(schema="app", table_prefix="ob_"), id="app-ob"),
    pytest.param(OutboxSettings(schema="order", table_prefix=""), id="reserved-no-prefix"),
    pytest.param(OutboxSettings(schema="s", table_prefix="p" * 40 + "_"), id="longest-prefix"),
]
QUOTED = re.compile(r'"([^"]*)"')


def _migration_dir_files() -> list[str]:
    folder = resources.files("schema") / "migrations"
    return sorted(f.name for f in folder.iterdir() if f.name != "__pycache__")


def test_migration_files_are_named_and_numbered_without_gaps() -> None:
    """Every file is NNNN_slug.sql and the numbers run 1, 2, 3... in file-name order."""
    names = _migration_dir_files()
    assert names, "no migration files shipped"
    for name in names:
        assert re.fullmatch(r"\d{4}_[a-z0-9_]+\.sql", name), name
    migrations = schema.all_migrations()
    assert [f"{m.label}.sql" for m in migrations] == names
    assert [m.version for m in migrations] == list(range(1, len(names) + 1))
    assert schema.latest_version() == len(names)


def test_templates_are_the_file_contents() -> None:
    """Each Migration carries its file's text, so the checksum covers exactly what is run."""
    folder = resources.files("schema") / "migrations"
    for migration in schema.all_migrations():
        text = (folder / f"{migration.label}.sql").read_text("utf-8")
        assert migration.template == text
        assert migration.checksum == hashlib.sha256(text.encode("utf-8")).hexdigest()


def test_checksums_are_stable() -> None:
    """The checksum is a SHA-256 hex digest that depends on the file only, not on settings."""
    first = [m.checksum for m in schema.all_migrations()]
    schema.all_migrations.cache_clear()
    try:
        again = [m.checksum for m in schema.all_migrations()]
    finally:
        schema.all_migrations.cache_clear()
    assert first == again
    assert all(re.fullmatch(r"[0-9a-f]{64}", c) for c in first)
    assert len(set(first)) == len(first)


def test_released_migrations_are_unchanged() -> None:
    """Released migration files are append-only: their checksums are pinned."""
    shipped = {m.version: m.checksum for m in schema.all_migrations()}
    for version, checksum in RELEASED_CHECKSUMS.items():
        assert shipped[version] == checksum, (
            f"migration {version} was edited; databases that applied it will refuse this "
            "version. Restore it and put the change in a new migration."
        )


@pytest.mark.parametrize("settings", SETTINGS)
def test_every_placeholder_renders(settings: OutboxSettings) -> None:
    """No placeholder survives rendering, whatever the schema and prefix."""
    for migration in schema.all_migrations():
        assert "{{" in migration.template  # the templates do use placeholders
        rendered = migration.render(settings)
        assert "{{" not in rendered
        assert "}}" not in rendered


@pytest.mark.parametrize("settings", SETTINGS)
def test_rendered_sql_uses_only_quoted_identifiers_from_the_settings(
    settings: OutboxSettings,
) -> None:
    """Every quoted identifier is the schema or a prefixed name that PostgreSQL will not cut."""
    sql = schema.script(settings)
    body = re.sub(r"--[^\n]*", "", sql)  # comments may quote words
    identifiers = set(QUOTED.findall(body))
    assert settings.schema in identifiers
    for name in identifiers - {settings.schema}:
        assert name.startswith(settings.table_prefix), name
        assert re.fullmatch(r"[a-z_][a-z0-9_]*", name), name
        assert len(name) <= MAX_IDENTIFIER_LENGTH, name
    # Every table is schema-qualified, every object created carries the prefix.
    schema_q = re.escape(f'"{settings.schema}"')
    prefix = re.escape(settings.table_prefix)
    tables = re.findall(r"(?:CREATE TABLE|INSERT INTO|\bON)\s+(?:IF NOT EXISTS\s+)?([^\s;]+)", body)
    # The partitions of published events are named in PL/pgSQL after their parent, whose
    # catalog name carries the prefix (their names: test_retention.py).
    tables = [table for table in tables if table != "%I.%I"]
    objects = re.findall(r"(?:CONSTRAINT|CREATE INDEX)\s+(\S+)", body)
    assert tables
    assert objects
    for table in tables:
        assert re.fullmatch(rf'{schema_q}\."{prefix}[a-z0-9_]+"', table), table
    for name in objects:
        assert re.fullmatch(rf'"{prefix}[a-z0-9_]+"', name), name


def test_custom_schema_and_prefix_replace_the_defaults() -> None:
    """With schema app and prefix ob_ the SQL names "app"."ob_events" and never the defaults."""
    sql = schema.script(OutboxSettings(schema="app", table_prefix="ob_"))
    assert 'CREATE SCHEMA IF NOT EXISTS "app"' in sql
    assert 'CREATE TABLE "app"."ob_events"' in sql
    assert 'CREATE TABLE "app"."ob_dedup"' in sql
    assert 'CREATE TABLE IF NOT EXISTS "app"."ob_schema_migrations"' in sql
    assert 'CONSTRAINT "ob_events_pkey"' in sql
    assert 'CREATE INDEX "ob_events_unpublished_idx"' in sql
    assert "outbox_" not in sql
    assert '"public"' not in sql


def test_default_script_targets_public_outbox_tables() -> None:
    """By default the SQL creates "public"."outbox_events" and does not create the schema."""
    sql = schema.script(OutboxSettings())
    assert 'CREATE TABLE "public"."outbox_events"' in sql
    assert 'CREATE TABLE "public"."outbox_dedup"' in sql
    assert "CREATE SCHEMA" not in sql


@pytest.mark.parametrize("settings", SETTINGS)
def test_script_is_one_transaction_recording_every_migration(settings: OutboxSettings) -> None:
    """script() wraps everything in BEGIN/COMMIT, takes the lock and records each migration."""
    sql = schema.script(settings)
    lines = sql.splitlines()
    assert lines[0].startswith("-- outbox-relay schema")
    statements = [line for line in lines if line and not line.startswith("--")]
    assert statements[0] == "BEGIN;"
    assert statements[1] == schema.lock_statement(settings) + ";"
    assert statements[-1] == "COMMIT;"
    assert sql.count("BEGIN;") == sql.count("COMMIT;") == 1
    assert sql.endswith("COMMIT;\n")
    for statement in schema.bootstrap_statements(settings):
        assert sql.index(statement + ";") < sql.index(f"-- {schema.all_migrations()[0].label}")
    position = 0
    for migration in schema.all_migrations():
        body = sql.index(migration.render(settings).strip(), position)
        record = sql.index(schema.record_statement(settings, migration) + ";", body)
        position = record
    assert sql.count(f"INSERT INTO {settings.migrations_table} ") == len(schema.all_migrations())


def test_record_statement_stores_version_name_and_checksum() -> None:
    """The bookkeeping INSERT carries exactly what status() later compares."""
    settings = OutboxSettings(schema="app", table_prefix="ob_")
    migration = schema.all_migrations()[0]
    assert schema.record_statement(settings, migration) == (
        'INSERT INTO "app"."ob_schema_migrations" (version, name, checksum) '
        f"VALUES (1, '{migration.name}', '{migration.checksum}')"
    )


@pytest.mark.parametrize("template", ["{{nope}}", "{{p:Events}}", "{{ schema }}", "{{p:}}"])
def test_unknown_placeholder_is_a_packaging_error(template: str) -> None:
    """A typo in a placeholder fails loudly instead of reaching PostgreSQL."""
    with pytest.raises(schema.MigrationFileError, match="unknown placeholder"):
        schema.render(f"CREATE TABLE {template} ()", OutboxSettings())


def test_render_replaces_schema_and_prefixed_names() -> None:
    """{{schema}} becomes the quoted schema and {{p:x}} the quoted prefixed name."""
    settings = OutboxSettings(schema="app", table_prefix="ob_")
    rendered = schema.render("SELECT * FROM {{schema}}.{{p:events}} -- {{p:x_1}}", settings)
    assert rendered == 'SELECT * FROM "app"."ob_events" -- "ob_x_1"'
