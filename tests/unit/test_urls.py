"""Database URLs: both spellings accepted, each library gets its own, passwords never shown."""

from __future__ import annotations

import pytest
from psycopg.conninfo import conninfo_to_dict
from sqlalchemy.engine import make_url

import outbox
from outbox import urls

TCP = {"user": "app", "password": "s3cret", "host": "db.example", "port": "6543", "dbname": "shop"}
SOCKET = {"user": "postgres", "host": "/var/run/postgresql", "dbname": "shop"}
SOCKET_WITH_PORT = {
    "user": "postgres",
    "host": "/var/run/postgresql",
    "port": "5433",
    "dbname": "shop",
}
IPV6 = {"user": "app", "host": "::1", "port": "5433", "dbname": "shop"}
QUERY = {
    "user": "app",
    "password": "p@ss:w/rd",
    "host": "h",
    "dbname": "shop",
    "sslmode": "require",
    "application_name": "billing",
}

#: (URL without scheme, what libpq must understand from it)
FORMS = [
    pytest.param("app:s3cret@db.example:6543/shop", TCP, id="tcp"),
    pytest.param("postgres@/shop?host=/var/run/postgresql", SOCKET, id="unix-socket"),
    pytest.param(
        "postgres@/shop?host=/var/run/postgresql&port=5433", SOCKET_WITH_PORT, id="socket-port"
    ),
    pytest.param(
        "app:p%40ss%3Aw%2Frd@h/shop?sslmode=require&application_name=billing", QUERY, id="query"
    ),
    pytest.param("app@[::1]:5433/shop", IPV6, id="ipv6"),
]
SCHEMES = ["postgresql://", "postgres://", "postgresql+psycopg://"]


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("rest", "expected"), FORMS)
def test_to_libpq_keeps_every_part(scheme: str, rest: str, expected: dict[str, str]) -> None:
    """Any accepted spelling becomes a postgresql:// URL libpq reads as the same connection."""
    libpq = urls.to_libpq(scheme + rest)
    assert libpq.startswith("postgresql://")
    assert conninfo_to_dict(libpq) == expected


@pytest.mark.parametrize("scheme", SCHEMES)
@pytest.mark.parametrize(("rest", "expected"), FORMS)
def test_to_sqlalchemy_keeps_every_part(scheme: str, rest: str, expected: dict[str, str]) -> None:
    """Any accepted spelling becomes a postgresql+psycopg:// URL naming the same connection."""
    sa_url = urls.to_sqlalchemy(scheme + rest)
    assert sa_url.startswith("postgresql+psycopg://")
    parsed = make_url(sa_url)
    assert parsed.get_dialect().driver == "psycopg"
    assert (parsed.username, parsed.password, parsed.database) == (
        expected.get("user"),
        expected.get("password"),
        expected["dbname"],
    )
    # Converting back gives libpq exactly the same connection parameters.
    assert conninfo_to_dict(urls.to_libpq(sa_url)) == expected


@pytest.mark.parametrize("scheme", SCHEMES)
def test_conversions_are_idempotent(scheme: str) -> None:
    """Converting a converted URL again changes nothing."""
    url = f"{scheme}app:s3cret@db.example:6543/shop?host=/var/run/postgresql"
    libpq = urls.to_libpq(url)
    sa_url = urls.to_sqlalchemy(url)
    assert urls.to_libpq(libpq) == libpq
    assert urls.to_sqlalchemy(sa_url) == sa_url
    assert urls.to_libpq(sa_url) == libpq
    assert urls.to_sqlalchemy(libpq) == sa_url


def test_surrounding_whitespace_is_ignored() -> None:
    """A URL pasted with a trailing newline (as from a secrets file) still works."""
    assert urls.to_libpq("  postgresql://app@h/shop\n") == "postgresql://app@h/shop"


def test_with_database_changes_only_the_database() -> None:
    """with_database keeps server, credentials and query, and returns the libpq form."""
    url = urls.with_database(
        "postgresql+psycopg://app:s3cret@h:6543/shop?host=/var/run/postgresql", "other"
    )
    assert conninfo_to_dict(url) == {
        "user": "app",
        "password": "s3cret",
        "host": "/var/run/postgresql",
        "port": "6543",
        "dbname": "other",
    }


@pytest.mark.parametrize(
    ("url", "scheme"),
    [
        ("mysql://app:s3cret@h/shop", "mysql"),
        ("postgresql+asyncpg://app@h/shop", "postgresql+asyncpg"),
        ("postgresql+psycopg2://app@h/shop", "postgresql+psycopg2"),
        ("sqlite:///shop.db", "sqlite"),
        ("http://h/shop", "http"),
    ],
)
@pytest.mark.parametrize("convert", [urls.to_libpq, urls.to_sqlalchemy, urls.parse])
def test_unsupported_scheme_is_a_configuration_error(
    url: str, scheme: str, convert: object
) -> None:
    """Other databases and drivers are refused with a message saying what to use instead."""
    with pytest.raises(outbox.ConfigurationError) as excinfo:
        convert(url)  # type: ignore[operator]
    message = str(excinfo.value)
    assert repr(scheme) in message
    assert "postgresql://" in message
    assert "postgresql+psycopg://" in message
    assert "s3cret" not in message


@pytest.mark.parametrize("url", ["", "   ", "\n", None])
def test_missing_url_names_the_option_and_variable(url: str | None) -> None:
    """No URL at all says how to give one: --database-url or OUTBOX_DATABASE_URL."""
    with pytest.raises(outbox.ConfigurationError) as excinfo:
        urls.to_libpq(url)  # type: ignore[arg-type]
    assert "--database-url" in str(excinfo.value)
    assert "OUTBOX_DATABASE_URL" in str(excinfo.value)


@pytest.mark.parametrize(
    "url",
    [
        "garbage",
        "://",
        "localhost:5432",
        "app:hunter2@db.example/shop",  # scheme forgotten
        "postgresql://app:hunter2@h:notaport/shop",
    ],
)
def test_garbage_is_a_configuration_error_that_hides_the_password(url: str) -> None:
    """Unparseable text is refused with the expected form, never echoing a password."""
    with pytest.raises(outbox.ConfigurationError) as excinfo:
        urls.to_libpq(url)
    message = str(excinfo.value)
    assert "expected postgresql://user:password@host:port/database" in message
    assert "hunter2" not in message
    assert isinstance(excinfo.value, ValueError)


@pytest.mark.parametrize(
    ("url", "shown"),
    [
        (
            "postgresql://app:hunter2@db.example:6543/shop",
            "postgresql://app:***@db.example:6543/shop",
        ),
        ("postgres://app:hunter2@db.example/shop", "postgres://app:***@db.example/shop"),
        ("postgresql+psycopg://app:hunter2@h/shop", "postgresql+psycopg://app:***@h/shop"),
        ("postgresql://app:hunt%40er2@h/shop", "postgresql://app:***@h/shop"),
        ("postgresql://app@h/shop?password=hunter2", "postgresql://app@h/shop?password=***"),
        (
            "postgresql://app@h/shop?sslmode=require&password=hunter2&connect_timeout=5",
            "postgresql://app@h/shop?connect_timeout=5&password=***&sslmode=require",
        ),
        ("mysql://app:hunter2@h/shop", "mysql://app:***@h/shop"),
        ("app:hunter2@db.example/shop", "app:***@db.example/shop"),
        ("postgresql://app:hunter2@h:notaport/shop", "postgresql://app:***@h:notaport/shop"),
    ],
)
def test_redact_hides_the_password_and_keeps_the_rest(url: str, shown: str) -> None:
    """redact shows user, host, port and database but never the password, even if malformed."""
    redacted = urls.redact(url)
    assert redacted == shown
    assert "hunter2" not in redacted
    assert "hunt" not in redacted


@pytest.mark.parametrize(
    "url",
    ["postgresql://app@h:5432/shop", "postgresql:///shop?host=/var/run/postgresql", "garbage", ""],
)
def test_redact_leaves_urls_without_password_readable(url: str) -> None:
    """Without a password there is nothing to hide; the URL stays recognisable."""
    assert "***" not in urls.redact(url)
    assert urls.redact(url).replace("%2F", "/") == url
