"""PostgreSQL URLs: accept SQLAlchemy and libpq forms, hand each library the form it needs.

Users give ``postgresql+psycopg://...`` (SQLAlchemy) or ``postgresql://...`` / ``postgres://...``
(libpq). SQLAlchemy engines need the first, psycopg needs the second, and logs need neither
password. Pure code.
"""

from __future__ import annotations

import re

import sqlalchemy.exc
from sqlalchemy.engine import URL, make_url

from outbox.errors import ConfigurationError

_ACCEPTED = ("postgresql", "postgres", "postgresql+psycopg")
_PASSWORD_PARAMETER = re.compile(r"([?&]password=)[^&]*", re.IGNORECASE)


def parse(url: str) -> URL:
    """Parse and check a PostgreSQL URL; ConfigurationError names what is wrong."""
    if not isinstance(url, str) or not url.strip():
        raise ConfigurationError(
            "no database URL given: pass --database-url or set OUTBOX_DATABASE_URL "
            "(for example postgresql://user:password@localhost:5432/app)"
        )
    try:
        parsed = make_url(url.strip())
    except (sqlalchemy.exc.ArgumentError, ValueError) as exc:
        raise ConfigurationError(
            f"cannot parse database URL {_redact_text(url)!r}: expected "
            "postgresql://user:password@host:port/database"
        ) from exc
    if parsed.drivername not in _ACCEPTED:
        raise ConfigurationError(
            f"database URL scheme {parsed.drivername!r} is not supported: use postgresql:// "
            "or postgresql+psycopg:// (outbox-relay runs on PostgreSQL with psycopg 3)"
        )
    return parsed


def to_sqlalchemy(url: str) -> str:
    """The URL for ``sqlalchemy.create_engine``, using the psycopg 3 driver."""
    return parse(url).set(drivername="postgresql+psycopg").render_as_string(hide_password=False)


def to_libpq(url: str) -> str:
    """The URL for ``psycopg.connect`` (libpq syntax)."""
    return parse(url).set(drivername="postgresql").render_as_string(hide_password=False)


def redact(url: str) -> str:
    """The URL with its password hidden, for messages and logs."""
    try:
        return _redact_query(parse(url).render_as_string(hide_password=True))
    except ConfigurationError:
        return _redact_text(url)


def _redact_text(url: str) -> str:
    """Best effort for text that is not a valid URL: hide what could be a password."""
    head, sep, tail = url.rpartition("@")
    if sep:
        scheme, slashes, userinfo = head.partition("//") if "//" in head else ("", "", head)
        if ":" in userinfo:
            url = f"{scheme}{slashes}{userinfo.split(':', 1)[0]}:***@{tail}"
    return _redact_query(url)


def _redact_query(url: str) -> str:
    """libpq also takes the password as a query parameter: ``...?password=secret``."""
    return _PASSWORD_PARAMETER.sub(r"\g<1>***", url)


def with_database(url: str, database: str) -> str:
    """The same server and credentials, another database (libpq form)."""
    return (
        parse(url)
        .set(drivername="postgresql", database=database)
        .render_as_string(hide_password=False)
    )
