"""Apply the migrations to a database and tell whether a database is current.

``apply`` runs every pending migration in one transaction, under an advisory lock, so two
processes applying at once serialise and the second finds nothing left to do. Each migration is
recorded (version, name, checksum) in the same transaction that runs it.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

import psycopg

from outbox.connections import require_transaction
from outbox.errors import SchemaMismatchError, SchemaMissingError, SchemaOutdatedError
from outbox.schema import (
    Migration,
    all_migrations,
    bootstrap_statements,
    latest_version,
    lock_statement,
    record_statement,
)
from outbox.settings import OutboxSettings

APPLY_HINT = "run `outbox-relay schema apply`"


@dataclass(frozen=True, slots=True)
class SchemaStatus:
    """How the database's outbox schema compares with the migrations of this version."""

    applied: tuple[int, ...]
    pending: tuple[Migration, ...]
    unknown: tuple[int, ...]
    changed: tuple[int, ...]

    @property
    def current(self) -> bool:
        return not (self.pending or self.unknown or self.changed)


def _run(conn: psycopg.Connection[Any], sql: str, params: tuple[object, ...] = ()) -> Any:
    return conn.execute(sql, params or None)


def status(conn: psycopg.Connection[Any], settings: OutboxSettings) -> SchemaStatus:
    """Compare the applied migrations with those shipped; SchemaMissingError if none were."""
    table = settings.migrations_table
    exists = _run(conn, "SELECT to_regclass(%s) IS NOT NULL", (table,)).fetchone()[0]
    if not exists:
        raise SchemaMissingError(
            f"the outbox schema is not installed: table {table} does not exist; {APPLY_HINT}"
        )
    rows = _run(
        conn,
        settings.sql(
            "SELECT version, checksum FROM {table} ORDER BY version", table="schema_migrations"
        ),
    ).fetchall()
    recorded = {version: checksum for version, checksum in rows}
    shipped = {m.version: m for m in all_migrations()}
    return SchemaStatus(
        applied=tuple(recorded),
        pending=tuple(m for v, m in shipped.items() if v not in recorded),
        unknown=tuple(v for v in recorded if v not in shipped),
        changed=tuple(v for v, c in recorded.items() if v in shipped and shipped[v].checksum != c),
    )


def require_current(conn: psycopg.Connection[Any], settings: OutboxSettings) -> SchemaStatus:
    """Raise a SchemaError that says what to do unless every shipped migration is applied."""
    found = status(conn, settings)
    if found.unknown:
        raise SchemaMismatchError(
            f"the database has outbox migrations {list(found.unknown)} that this version of "
            f"outbox-relay does not know (it ships 1..{latest_version()}): upgrade outbox-relay"
        )
    if found.changed:
        raise SchemaMismatchError(
            f"applied outbox migrations {list(found.changed)} differ from the files shipped with "
            "this version (checksum mismatch): migrations are append-only, restore the originals"
        )
    if found.pending:
        labels = ", ".join(m.label for m in found.pending)
        raise SchemaOutdatedError(f"the outbox schema is behind: pending {labels}; {APPLY_HINT}")
    return found


def apply(
    conn: psycopg.Connection[Any], settings: OutboxSettings, *, lock_timeout_ms: int = 60_000
) -> list[Migration]:
    """Apply every pending migration in one transaction; return the ones applied (maybe none).

    ``lock_timeout_ms`` bounds how long any lock (the advisory lock or a table lock held by a busy
    application) is waited for before giving up, leaving the database as it was.
    """
    with conn.transaction():
        _run(conn, f"SET LOCAL lock_timeout = {int(lock_timeout_ms):d}")
        return apply_pending(conn, settings)


def apply_pending(conn: psycopg.Connection[Any], settings: OutboxSettings) -> list[Migration]:
    """Apply every pending migration in the transaction ``conn`` has open, which the caller
    commits (a migration tool's: Alembic's revision, Django's migration); return those applied.

    Takes the same advisory lock as :func:`apply` until that transaction ends, so concurrent
    appliers still serialise.
    """
    require_transaction(conn)
    _run(conn, lock_statement(settings))
    for statement in bootstrap_statements(settings):
        _run(conn, statement)
    found = status(conn, settings)
    if found.unknown or found.changed:
        require_current(conn, settings)
    for migration in found.pending:
        _run(conn, migration.render(settings))
        _run(conn, record_statement(settings, migration))
    return list(found.pending)
