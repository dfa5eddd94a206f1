"""The one place that names things: PostgreSQL schema, tables, indexes, the old NOTIFY channel.

Every SQL identifier the library emits comes from :class:`OutboxSettings`, which validates the
user-supplied parts (schema and table prefix) against a strict pattern and quotes them with
psycopg's ``sql.Identifier``. SQL built in Python names the outbox's objects one way only:
:meth:`OutboxSettings.sql`, e.g. ``settings.sql("SELECT ... FROM {events}", events="events")``.
"""

from __future__ import annotations

import re
from dataclasses import dataclass

from psycopg import sql as pg_sql

from outbox.errors import ConfigurationError, InvalidIdentifierError

#: Number of shards rows are spread over. Fixed by the schema (the ``shard`` column is computed
#: from the key by PostgreSQL), so changing it needs a migration.
SHARD_COUNT = 256

#: Kafka's own default for ``message.max.bytes`` is about 1 MB; larger events belong elsewhere.
DEFAULT_MAX_PAYLOAD_BYTES = 1024 * 1024

#: PostgreSQL truncates identifiers longer than this (NAMEDATALEN - 1).
MAX_IDENTIFIER_LENGTH = 63

_IDENTIFIER = re.compile(r"[a-z_][a-z0-9_]*")
_PREFIX = re.compile(r"([a-z_][a-z0-9_]*)?")
# The longest suffix appended to the prefix (see the migrations), so that prefix + suffix fits.
_LONGEST_SUFFIX = len("events_unpublished_idx")


def render_sql(template: str, **parts: pg_sql.Composable) -> str:
    """``template`` with each ``{name}`` replaced by ``parts[name]`` rendered as SQL text.

    Literal braces in the template (``'{}'::bool[]``) must be doubled (``'{{}}'``). Rendered to
    ``str`` once, where the statement is built: SQLAlchemy's ``exec_driver_sql`` takes only
    text, and psycopg would render a ``sql.Composed`` again on every ``execute``.
    """
    return pg_sql.SQL(template).format(**parts).as_string()


def validate_identifier(name: str, *, what: str) -> str:
    """Return ``name`` if it is a plain lower-case PostgreSQL identifier, else raise."""
    if not isinstance(name, str) or not _IDENTIFIER.fullmatch(name):
        raise InvalidIdentifierError(
            f"{what} {name!r} is not allowed: use lower-case letters, digits and underscores, "
            "starting with a letter or underscore"
        )
    if len(name) > MAX_IDENTIFIER_LENGTH:
        raise InvalidIdentifierError(
            f"{what} {name!r} is {len(name)} characters; PostgreSQL allows {MAX_IDENTIFIER_LENGTH}"
        )
    return name


@dataclass(frozen=True, slots=True)
class OutboxSettings:
    """Where the outbox lives and how large an event may be.

    ``schema`` is the PostgreSQL schema (namespace) holding the tables; ``table_prefix`` is put
    in front of every table, index and function name, so several outboxes can share a schema.
    """

    schema: str = "public"
    table_prefix: str = "outbox_"
    max_payload_bytes: int = DEFAULT_MAX_PAYLOAD_BYTES

    def __post_init__(self) -> None:
        validate_identifier(self.schema, what="schema")
        if not isinstance(self.table_prefix, str) or not _PREFIX.fullmatch(self.table_prefix):
            raise InvalidIdentifierError(
                f"table prefix {self.table_prefix!r} is not allowed: use lower-case letters, "
                "digits and underscores, starting with a letter or underscore (or leave it empty)"
            )
        if len(self.table_prefix) + _LONGEST_SUFFIX > MAX_IDENTIFIER_LENGTH:
            raise InvalidIdentifierError(
                f"table prefix {self.table_prefix!r} is too long: at most "
                f"{MAX_IDENTIFIER_LENGTH - _LONGEST_SUFFIX} characters"
            )
        if isinstance(self.max_payload_bytes, bool) or not isinstance(self.max_payload_bytes, int):
            raise ConfigurationError("max_payload_bytes must be an integer")
        if self.max_payload_bytes <= 0:
            raise ConfigurationError(
                f"max_payload_bytes must be positive, got {self.max_payload_bytes}"
            )

    def name(self, suffix: str) -> str:
        """The unquoted name of one of the outbox's objects, e.g. ``name("events")``."""
        return validate_identifier(self.table_prefix + suffix, what="object name")

    def identifier(self, suffix: str, *, qualified: bool = True) -> pg_sql.Identifier:
        """One of the outbox's objects (table, function, sequence, index) as a psycopg
        identifier: schema-qualified unless ``qualified=False`` (indexes, constraints)."""
        if qualified:
            return pg_sql.Identifier(self.schema, self.name(suffix))
        return pg_sql.Identifier(self.name(suffix))

    def sql(self, template: str, **names: str | pg_sql.Composable) -> str:
        """Build a statement: each ``{name}`` in ``template`` becomes the qualified identifier
        of the object with suffix ``names[name]`` (a str), or ``names[name]`` itself when it is
        already a psycopg ``Composable`` (a fragment, a literal). See :func:`render_sql`."""
        return render_sql(
            template,
            **{
                name: self.identifier(part) if isinstance(part, str) else part
                for name, part in names.items()
            },
        )

    def qualified(self, suffix: str) -> str:
        """The quoted, schema-qualified name of an object as text, for messages and
        ``to_regclass``; SQL is built with :meth:`sql`."""
        return self.identifier(suffix).as_string()

    @property
    def events_table(self) -> str:
        """Quoted, qualified name of the outbox (events) table."""
        return self.qualified("events")

    @property
    def dedup_table(self) -> str:
        """Quoted, qualified name of the consumer dedup table."""
        return self.qualified("dedup")

    @property
    def migrations_table(self) -> str:
        """Quoted, qualified name of the table recording applied migrations."""
        return self.qualified("schema_migrations")

    @property
    def notify_channel(self) -> str:
        """The NOTIFY channel of migration 0001's trigger, dropped by 0005 (unquoted)."""
        return self.name("events")
