"""OutboxSettings: the only source of SQL identifiers, so it must refuse anything unsafe."""

from __future__ import annotations

import dataclasses

import pytest

import outbox
from outbox.settings import (
    DEFAULT_MAX_PAYLOAD_BYTES,
    MAX_IDENTIFIER_LENGTH,
    OutboxSettings,
)

#: The longest prefix that still leaves room for every suffix the migrations append.
LONGEST_PREFIX = 41

UNSAFE_NAMES = [
    pytest.param("a;drop table x", id="statement-separator"),
    pytest.param("A", id="upper-case"),
    pytest.param('x"y', id="double-quote"),
    pytest.param("x'y", id="single-quote"),
    pytest.param("a'b", id="quote-in-middle"),
    pytest.param("1abc", id="leading-digit"),
    pytest.param("a b", id="space"),
    pytest.param("a-b", id="dash"),
    pytest.param("a.b", id="dot"),
    pytest.param("a\nb", id="newline"),
    pytest.param("a--", id="comment"),
    pytest.param("é", id="non-ascii"),
    pytest.param("app\x00", id="nul"),
    pytest.param("app ", id="trailing-space"),
    pytest.param("app\n", id="trailing-newline"),
]
NOT_STRINGS = [
    pytest.param(None, id="none"),
    pytest.param(1, id="int"),
    pytest.param(b"app", id="bytes"),
    pytest.param(["app"], id="list"),
]


@pytest.mark.parametrize("name", [*UNSAFE_NAMES, pytest.param("", id="empty"), *NOT_STRINGS])
def test_unsafe_schema_is_rejected_naming_the_value(name: object) -> None:
    """A schema that is not a plain lower-case identifier raises, and the message quotes it."""
    with pytest.raises(outbox.InvalidIdentifierError) as excinfo:
        OutboxSettings(schema=name)  # type: ignore[arg-type]
    assert repr(name) in str(excinfo.value)
    assert "schema" in str(excinfo.value)


@pytest.mark.parametrize("prefix", [*UNSAFE_NAMES, *NOT_STRINGS])
def test_unsafe_table_prefix_is_rejected_naming_the_value(prefix: object) -> None:
    """A table prefix that is not a plain lower-case identifier raises, naming the value."""
    with pytest.raises(outbox.InvalidIdentifierError) as excinfo:
        OutboxSettings(table_prefix=prefix)  # type: ignore[arg-type]
    assert repr(prefix) in str(excinfo.value)
    assert "table prefix" in str(excinfo.value)


def test_invalid_identifier_error_is_a_configuration_and_value_error() -> None:
    """Callers can catch bad identifiers as OutboxError, ConfigurationError or ValueError."""
    assert issubclass(outbox.InvalidIdentifierError, outbox.ConfigurationError)
    assert issubclass(outbox.InvalidIdentifierError, outbox.OutboxError)
    with pytest.raises(ValueError, match="not allowed"):
        OutboxSettings(schema="a;drop table x")


def test_schema_of_the_maximum_length_is_accepted_and_one_more_is_rejected() -> None:
    """63 characters is PostgreSQL's limit; 64 would be silently truncated, so it is refused."""
    longest = "s" * MAX_IDENTIFIER_LENGTH
    assert OutboxSettings(schema=longest).schema == longest
    too_long = "s" * (MAX_IDENTIFIER_LENGTH + 1)
    with pytest.raises(outbox.InvalidIdentifierError, match="64 characters") as excinfo:
        OutboxSettings(schema=too_long)
    assert too_long in str(excinfo.value)


def test_longest_prefix_is_accepted_and_one_more_is_rejected() -> None:
    """The prefix must leave room for the longest object-name suffix within 63 characters."""
    longest = "p" * (LONGEST_PREFIX - 1) + "_"
    settings = OutboxSettings(table_prefix=longest)
    assert len(settings.name("events_unpublished_idx")) == MAX_IDENTIFIER_LENGTH
    too_long = "p" * LONGEST_PREFIX + "_"
    with pytest.raises(outbox.InvalidIdentifierError, match="too long") as excinfo:
        OutboxSettings(table_prefix=too_long)
    assert repr(too_long) in str(excinfo.value)


@pytest.mark.parametrize(
    ("schema", "prefix"),
    [
        ("public", "outbox_"),
        ("app", "ob_"),
        ("_private", "_"),
        ("s3", "v2_"),
        ("order", "select_"),  # reserved words are fine: every identifier is quoted
        ("app", "ob"),
    ],
)
def test_valid_identifiers_are_accepted(schema: str, prefix: str) -> None:
    """Plain lower-case identifiers (letters, digits, underscores) are kept as given."""
    settings = OutboxSettings(schema=schema, table_prefix=prefix)
    assert (settings.schema, settings.table_prefix) == (schema, prefix)


def test_empty_prefix_is_allowed_and_names_objects_by_their_suffix() -> None:
    """With no prefix the tables are called events, dedup and schema_migrations."""
    settings = OutboxSettings(schema="app", table_prefix="")
    assert settings.events_table == '"app"."events"'
    assert settings.dedup_table == '"app"."dedup"'
    assert settings.migrations_table == '"app"."schema_migrations"'


def test_defaults_are_the_public_schema_and_outbox_prefix() -> None:
    """Out of the box the outbox is public.outbox_events with a 1 MiB payload limit."""
    settings = OutboxSettings()
    assert settings.events_table == '"public"."outbox_events"'
    assert settings.dedup_table == '"public"."outbox_dedup"'
    assert settings.migrations_table == '"public"."outbox_schema_migrations"'
    assert settings.max_payload_bytes == DEFAULT_MAX_PAYLOAD_BYTES == 1024 * 1024


def test_custom_names_are_quoted_and_schema_qualified() -> None:
    """qualified() quotes both parts; name() is the unquoted object name."""
    settings = OutboxSettings(schema="app", table_prefix="ob_")
    assert settings.name("events") == "ob_events"
    assert settings.qualified("events") == '"app"."ob_events"'
    assert settings.events_table == '"app"."ob_events"'
    assert settings.dedup_table == '"app"."ob_dedup"'
    assert settings.migrations_table == '"app"."ob_schema_migrations"'


@pytest.mark.parametrize("suffix", ["events; drop table x", 'events"', "Events", "x" * 60])
def test_object_names_are_validated_too(suffix: str) -> None:
    """A suffix that would make an unsafe or too long object name is refused as well."""
    with pytest.raises(outbox.InvalidIdentifierError):
        OutboxSettings().qualified(suffix)


@pytest.mark.parametrize("suffix", ["events; drop table x", 'events"', "Events", "x" * 60])
def test_sql_refuses_unsafe_object_names(suffix: str) -> None:
    """The SQL helper validates the object name before quoting it."""
    with pytest.raises(outbox.InvalidIdentifierError):
        OutboxSettings().sql("SELECT 1 FROM {t}", t=suffix)
    with pytest.raises(outbox.InvalidIdentifierError):
        OutboxSettings().identifier(suffix, qualified=False)


@pytest.mark.parametrize("limit", [0, -1, -(2**40)])
def test_non_positive_payload_limit_is_rejected(limit: int) -> None:
    """max_payload_bytes must be positive; the message shows the value given."""
    with pytest.raises(outbox.ConfigurationError, match="must be positive") as excinfo:
        OutboxSettings(max_payload_bytes=limit)
    assert str(limit) in str(excinfo.value)


@pytest.mark.parametrize("limit", ["1024", 1024.0, 1.5, True, False, None])
def test_non_integer_payload_limit_is_rejected(limit: object) -> None:
    """max_payload_bytes must be an int (bool, float and str are refused)."""
    with pytest.raises(outbox.ConfigurationError, match="must be an integer"):
        OutboxSettings(max_payload_bytes=limit)  # type: ignore[arg-type]


@pytest.mark.parametrize("limit", [1, 100, 10 * 1024 * 1024])
def test_positive_payload_limit_is_accepted(limit: int) -> None:
    """Any positive integer is a valid payload limit."""
    assert OutboxSettings(max_payload_bytes=limit).max_payload_bytes == limit


def test_settings_cannot_be_changed_after_validation() -> None:
    """Settings are frozen, so a validated instance cannot be given an unsafe name later."""
    settings = OutboxSettings()
    with pytest.raises(dataclasses.FrozenInstanceError):
        settings.schema = "a;drop table x"  # type: ignore[misc]
    assert settings.events_table == '"public"."outbox_events"'
