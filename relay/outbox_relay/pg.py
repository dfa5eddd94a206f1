"""The relay's PostgreSQL connections: every wait bounded, passwords kept out of messages."""

from __future__ import annotations

from typing import Any

import psycopg

from outbox import urls
from outbox.errors import ConfigurationError, OutboxError, one_line
from outbox_relay.config import RelaySettings

#: Every session of the relay and its commands carries this name (``application_name``).
APPLICATION_NAME = "outbox-relay"
#: The role of the session that holds a relay's shard locks; ``status`` lists relays by it.
OWNER_ROLE = "owner"


def application_name(role: str, relay_id: str) -> str:
    """The name of a relay's session in ``pg_stat_activity``: ``outbox-relay <role> <relay id>``,
    cut to PostgreSQL's 63 characters; :func:`relay_id_of` reads it back."""
    return f"{APPLICATION_NAME} {role} {relay_id}"[:63]


def relay_id_of(name: str, role: str) -> str | None:
    """The relay id (perhaps cut short) in a name :func:`application_name` made for ``role``;
    None when ``name`` is not one."""
    prefix = f"{APPLICATION_NAME} {role} "
    if not name.startswith(prefix):
        return None
    return name.removeprefix(prefix).strip() or None


class DatabaseUnavailableError(OutboxError):
    """PostgreSQL could not be reached or refused the connection."""


def connect(
    url: str, *, connect_timeout: float = 10.0, autocommit: bool = False, **params: Any
) -> psycopg.Connection[Any]:
    """Connect with a bounded wait; the error names the server (never the password)."""
    try:
        return psycopg.connect(
            urls.to_libpq(url),
            connect_timeout=max(1, round(connect_timeout)),
            autocommit=autocommit,
            **{"application_name": APPLICATION_NAME, **params},
        )
    except psycopg.OperationalError as exc:
        raise DatabaseUnavailableError(
            f"cannot connect to PostgreSQL at {urls.redact(url)}: {one_line(exc)}"
        ) from exc
    except psycopg.ProgrammingError as exc:
        raise ConfigurationError(
            f"invalid connection settings in {urls.redact(url)}: {exc}"
        ) from exc


def relay_connect(
    settings: RelaySettings, *, role: str, autocommit: bool
) -> psycopg.Connection[Any]:
    """A connection for one of the relay's roles, with server-side timeouts and TCP keepalives.

    ``idle_in_transaction_session_timeout`` is longer than a batch may take (delivery timeout plus
    grace), so a relay that hangs mid-batch loses its transaction and its row locks, and other
    relays can take the rows over. ``synchronous_commit`` is the relay's setting: what its
    sessions commit only records what became of rows, so a commit lost in a crash means
    duplicates, never a loss.
    """
    idle_limit = settings.delivery_timeout + settings.grace_period + settings.statement_timeout

    def ms(seconds: float) -> int:
        return round(seconds * 1000)

    options = (
        f"-c statement_timeout={ms(settings.statement_timeout)} "
        f"-c lock_timeout={ms(settings.lock_timeout)} "
        f"-c idle_in_transaction_session_timeout={ms(idle_limit)} "
        f"-c synchronous_commit={'on' if settings.synchronous_commit else 'off'} "
        # Claims, the scan floor and the wake-up need a fresh snapshot per statement, whatever
        # the role's or the database's default.
        r"-c default_transaction_isolation=read\ committed"
    )
    return connect(
        settings.database_url,
        connect_timeout=settings.connect_timeout,
        autocommit=autocommit,
        application_name=application_name(role, settings.relay_id),
        options=options,
        keepalives=1,
        keepalives_idle=10,
        keepalives_interval=5,
        keepalives_count=3,
        tcp_user_timeout=ms(settings.statement_timeout),
    )
