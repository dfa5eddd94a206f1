"""Opening PostgreSQL connections for the relay's commands, with bounds and clear errors."""

from __future__ import annotations

from typing import Any

import psycopg

from outbox import urls
from outbox.errors import ConfigurationError

APPLICATION_NAME = "outbox-relay"


class DatabaseUnavailableError(Exception):
    """PostgreSQL could not be reached or refused the connection."""


def connect(url: str, *, connect_timeout: float = 10.0) -> psycopg.Connection[Any]:
    """Connect with a bounded wait; the error names the server (never the password)."""
    libpq_url = urls.to_libpq(url)
    try:
        return psycopg.connect(
            libpq_url,
            connect_timeout=max(1, round(connect_timeout)),
            application_name=APPLICATION_NAME,
        )
    except psycopg.OperationalError as exc:
        reason = " ".join(str(exc).split()) or type(exc).__name__
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {urls.redact(url)}: {reason}"
        ) from exc
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"invalid connection settings in {urls.redact(url)}: {exc}"
        ) from exc
