"""What the app's Django migrations run: the outbox's own SQL migrations, in Django's."""

from __future__ import annotations

from typing import Any

import psycopg
from django.core.exceptions import ImproperlyConfigured

from outbox import migrator
from outbox.writer import default


def apply_outbox_migrations(apps: Any, schema_editor: Any) -> None:
    """Apply every outbox migration the database lacks, in the Django migration's transaction,
    recorded in the outbox's own table as ``outbox-relay schema apply`` records them; with the
    settings of ``OUTBOX_SETTINGS`` (or the defaults)."""
    connection = schema_editor.connection
    connection.ensure_connection()
    raw = connection.connection
    if not isinstance(raw, psycopg.Connection):
        raise ImproperlyConfigured(
            "outbox.django needs the PostgreSQL backend on psycopg 3 (Django 4.2+ with psycopg "
            f"installed); database {connection.alias!r} uses {connection.vendor!r}"
        )
    migrator.apply_pending(raw, default().settings)


def keep_outbox(apps: Any, schema_editor: Any) -> None:
    """Migrating backwards keeps the outbox: its migrations go forward only, and dropping its
    tables would drop the events the relay has not published yet and the dedup records."""
