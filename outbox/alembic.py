"""The outbox's tables in an Alembic revision history.

One revision of your own creates the outbox; when a later version of outbox-relay ships new
migrations, one more revision of your own applies them (``schema check`` says when)::

    # migrations/versions/2f1c_outbox.py
    from alembic import op

    import outbox.alembic

    revision = "2f1c"
    down_revision = "9a0b"

    def upgrade() -> None:
        outbox.alembic.upgrade(op)

    def downgrade() -> None:
        outbox.alembic.downgrade(op)

``upgrade`` runs every outbox migration the database lacks inside the revision's transaction,
and records each in the outbox's own migrations table, exactly as ``outbox-relay schema apply``
does, so ``schema check`` and the relay's start-up check pass afterwards, and the CLI and
Alembic can take turns. Needs the psycopg 3 driver (``postgresql+psycopg://``).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

import psycopg

from outbox import migrator
from outbox.errors import OutboxError, UnsupportedConnectionError
from outbox.settings import OutboxSettings
from outbox.writer import default

if TYPE_CHECKING:
    from alembic.operations import Operations


def upgrade(op: Operations, settings: OutboxSettings | None = None) -> list[str]:
    """Apply the outbox migrations the database lacks, in the revision's transaction; return
    their labels (``["0001_initial", ...]``; empty when the outbox is current).

    ``settings`` default to those of :func:`outbox.configure` (schema and table prefix).
    """
    conn = _psycopg_connection(op)
    applied = migrator.apply_pending(conn, settings or default().settings)
    return [migration.label for migration in applied]


def downgrade(op: Operations, settings: OutboxSettings | None = None) -> None:
    """Leave the outbox in place: its migrations go forward only.

    Dropping the tables would drop every event the relay has not published yet, and every
    dedup record a consumer relies on, so a downgrade past this revision keeps them, and a
    later ``upgrade`` finds nothing to do. To remove the outbox for good, drop its tables by
    hand once the relay has drained it (``outbox-relay status`` shows the backlog). The
    connection is still checked, so a misconfigured revision fails here rather than later.
    """
    _psycopg_connection(op)


def _psycopg_connection(op: Operations) -> psycopg.Connection[Any]:
    if op.get_context().as_sql:
        raise OutboxError(
            "outbox.alembic cannot run in offline mode (--sql): which outbox migrations are "
            "pending depends on the database; put the output of `outbox-relay schema show` in "
            "your SQL script instead"
        )
    bind = op.get_bind()
    driver = bind.connection.driver_connection
    if not isinstance(driver, psycopg.Connection):
        raise UnsupportedConnectionError(
            f"outbox.alembic needs the psycopg 3 driver; this engine uses "
            f"{bind.dialect.driver!r}: use a URL starting with postgresql+psycopg://"
        )
    return driver
