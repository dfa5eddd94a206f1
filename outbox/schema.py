"""The outbox's SQL schema: numbered, append-only migrations shipped inside the package.

Pure code: loading the migration files, rendering them for given settings, and producing the
script that ``outbox-relay schema show`` prints. Applying them to a database is in
:mod:`outbox.migrator`.

Migration files are named ``NNNN_slug.sql`` and numbered from 1 without gaps. They refer to
database objects only through placeholders (``{{schema}}``, ``{{p:events}}``), which are replaced
by the identifiers :meth:`outbox.OutboxSettings.identifier` makes, quoted by psycopg's
``sql.Identifier`` like every other statement the package builds.

The files keep their own placeholder syntax rather than ``OutboxSettings.sql``'s ``{events}``:
their checksums are recorded in databases, so their text cannot change, and PL/pgSQL bodies and
array literals use single braces, which ``str.format``-style templates would take for fields.
"""

from __future__ import annotations

import hashlib
import re
from dataclasses import dataclass, field
from functools import cache
from pathlib import Path

from psycopg import sql as pg_sql

from outbox.errors import OutboxError
from outbox.settings import OutboxSettings, render_sql

_FILE_NAME = re.compile(r"(\d{4})_([a-z0-9_]+)\.sql")
_PLACEHOLDER = re.compile(r"\{\{(schema|channel|p:[a-z0-9_]+)\}\}")
_LOCK_CLASS = "outbox-relay schema"


@dataclass(frozen=True, slots=True)
class Migration:
    """One migration file: its number, its name and its SQL template."""

    version: int
    name: str
    template: str = field(repr=False)

    @property
    def checksum(self) -> str:
        """SHA-256 of the template; applied migrations must never change."""
        return hashlib.sha256(self.template.encode("utf-8")).hexdigest()

    @property
    def label(self) -> str:
        return f"{self.version:04d}_{self.name}"

    def render(self, settings: OutboxSettings) -> str:
        """The migration's SQL with every placeholder replaced by a quoted identifier."""
        return render(self.template, settings)


class MigrationFileError(OutboxError):
    """The migration files shipped with the package are inconsistent (a packaging bug)."""


def render(template: str, settings: OutboxSettings) -> str:
    """Replace ``{{schema}}`` and ``{{p:suffix}}`` by validated, quoted identifiers, and
    ``{{channel}}`` by the NOTIFY channel as a string literal."""

    def replace(match: re.Match[str]) -> str:
        placeholder = match.group(1)
        if placeholder == "schema":
            part: pg_sql.Composable = pg_sql.Identifier(settings.schema)
        elif placeholder == "channel":
            part = pg_sql.Literal(settings.notify_channel)
        else:
            part = settings.identifier(placeholder.removeprefix("p:"), qualified=False)
        return part.as_string()

    rendered = _PLACEHOLDER.sub(replace, template)
    if "{{" in rendered:
        raise MigrationFileError(f"unknown placeholder in migration: {rendered!r:.200}")
    return rendered


def migrations_dir() -> Path:
    """Where the migration files are: ``outbox/migrations`` in an installed wheel, which carries
    the repository's ``schema/migrations`` there, or ``schema/migrations`` in a source checkout."""
    installed = Path(__file__).with_name("migrations")
    return installed if installed.is_dir() else Path(__file__).parents[1] / "schema" / "migrations"


@cache
def all_migrations() -> tuple[Migration, ...]:
    """All migrations shipped with this version, in order."""
    files = [f for f in migrations_dir().iterdir() if f.name.endswith(".sql")]
    found = []
    for file in files:
        match = _FILE_NAME.fullmatch(file.name)
        if not match:
            raise MigrationFileError(f"migration file {file.name!r} is not named NNNN_slug.sql")
        found.append(Migration(int(match.group(1)), match.group(2), file.read_text("utf-8")))
    found.sort(key=lambda m: m.version)
    versions = [m.version for m in found]
    if versions != list(range(1, len(found) + 1)):
        raise MigrationFileError(f"migrations must be numbered 1, 2, 3... without gaps: {versions}")
    return tuple(found)


def latest_version() -> int:
    return all_migrations()[-1].version


def lock_statement(settings: OutboxSettings) -> str:
    """Serialises concurrent appliers of outboxes in the same PostgreSQL schema.

    Keyed on the schema, not the table prefix: outboxes with different prefixes share the
    ``CREATE SCHEMA IF NOT EXISTS``, which fails if two transactions run it at once.
    """
    return render_sql(
        "SELECT pg_advisory_xact_lock(hashtext({lock_class}), hashtext({schema}))",
        lock_class=pg_sql.Literal(_LOCK_CLASS),
        schema=pg_sql.Literal(settings.schema),
    )


def bootstrap_statements(settings: OutboxSettings) -> list[str]:
    """Create the schema (namespace) if needed and the table recording applied migrations."""
    statements = []
    if settings.schema != "public":
        statements.append(
            render_sql(
                "CREATE SCHEMA IF NOT EXISTS {schema}", schema=pg_sql.Identifier(settings.schema)
            )
        )
    statements.append(
        settings.sql(
            "CREATE TABLE IF NOT EXISTS {table} (\n"
            "    version    integer PRIMARY KEY,\n"
            "    name       text NOT NULL,\n"
            "    checksum   text NOT NULL,\n"
            "    applied_at timestamptz NOT NULL DEFAULT now()\n"
            ")",
            table="schema_migrations",
        )
    )
    return statements


def record_statement(settings: OutboxSettings, migration: Migration) -> str:
    """The bookkeeping INSERT run in the same transaction as the migration itself."""
    return settings.sql(
        "INSERT INTO {table} (version, name, checksum) VALUES ({version}, {name}, {checksum})",
        table="schema_migrations",
        version=pg_sql.Literal(migration.version),
        name=pg_sql.Literal(migration.name),
        checksum=pg_sql.Literal(migration.checksum),
    )


def script(settings: OutboxSettings) -> str:
    """The full SQL of every migration, in one transaction, for ``psql`` or a migration tool.

    It records each migration like ``schema apply`` does, so ``schema check`` passes afterwards.
    """
    parts = [
        f"-- outbox-relay schema: PostgreSQL schema {settings.schema!r}, "
        f"table prefix {settings.table_prefix!r}, migrations 1..{latest_version()}",
        "BEGIN;",
        lock_statement(settings) + ";",
        *(statement + ";" for statement in bootstrap_statements(settings)),
    ]
    for migration in all_migrations():
        parts += [
            f"\n-- {migration.label}",
            migration.render(settings).strip(),
            record_statement(settings, migration) + ";",
        ]
    parts.append("COMMIT;")
    return "\n".join(parts) + "\n"
