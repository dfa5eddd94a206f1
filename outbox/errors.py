"""The one exception hierarchy of outbox-relay.

Every error the library raises on purpose derives from :class:`OutboxError`, so a caller can
catch the library's failures without catching everything. Errors about bad input also derive
from :class:`ValueError` (or :class:`TypeError`), so generic handlers keep working. A few live
next to the code that raises them (``DatabaseUnavailableError`` in ``outbox_relay.pg``,
``BrokerUnavailableError`` in ``outbox_relay.kafka``, ``ConsumerStopped`` in ``outbox.consumer``,
``MigrationFileError`` in ``schema``) and derive from :class:`OutboxError` too;
``tests/unit/test_errors.py`` checks every exception class of the packages.
"""

from __future__ import annotations


def one_line(exc: BaseException) -> str:
    """The error's text on one line (whitespace runs collapsed), or its type when it has none:
    for log fields and one-line messages (libpq's errors span several lines)."""
    return " ".join(str(exc).split()) or type(exc).__name__


class OutboxError(Exception):
    """Base class of every error raised by outbox-relay."""


class ConfigurationError(OutboxError, ValueError):
    """A setting is invalid (an identifier, a size limit, a URL)."""


class InvalidIdentifierError(ConfigurationError):
    """A PostgreSQL schema or table-name prefix that is not a safe, plain identifier."""


class InvalidEventError(OutboxError, ValueError):
    """An event was rejected before anything was written; the transaction is still usable."""


class InvalidTopicError(InvalidEventError):
    """A topic name that Kafka would refuse."""


class InvalidKeyError(InvalidEventError):
    """A key that is neither ``str`` nor ``bytes``."""


class InvalidHeaderError(InvalidEventError):
    """A header name or value that cannot be sent as a Kafka header."""


class PayloadSerializationError(InvalidEventError):
    """The serializer could not turn the payload into bytes."""


class InvalidScheduleError(InvalidEventError):
    """A ``deliver_at`` or ``delay`` that cannot say when to deliver (a naive datetime, a negative
    delay, both at once, a wrong type), or an event id to cancel that is not a UUID."""


class PayloadTooLargeError(InvalidEventError):
    """The encoded payload is larger than the configured maximum."""

    def __init__(self, size: int, limit: int) -> None:
        super().__init__(
            f"payload is {size} bytes, over the limit of {limit} bytes "
            "(OutboxSettings.max_payload_bytes); store large data elsewhere and send a reference"
        )
        self.size = size
        self.limit = limit


class UnsupportedConnectionError(OutboxError, TypeError):
    """``db`` is not a connection type the writer knows, or not a psycopg 3 connection."""


class TransactionRequiredError(OutboxError):
    """The connection is in autocommit mode, so the event would escape the caller's transaction."""


class SchemaError(OutboxError):
    """The outbox schema in the database is missing, behind, ahead, or altered."""


class SchemaMissingError(SchemaError):
    """The outbox tables do not exist: the migrations were never applied."""


class SchemaOutdatedError(SchemaError):
    """Migrations shipped with this version have not been applied yet."""


class SchemaMismatchError(SchemaError):
    """The database holds migrations this version does not know, or that were edited."""


class BrokerUnreachableError(OutboxError):
    """No Kafka broker answered a consume loop within ``ConsumerSettings.connect_timeout`` of
    its start."""

    def __init__(self, bootstrap_servers: str, timeout: float, reason: str) -> None:
        super().__init__(
            f"no Kafka broker answered at {bootstrap_servers} within {timeout:g} s "
            f"(ConsumerSettings.connect_timeout): {reason}. Check bootstrap_servers, and that a "
            "broker runs there and can be reached from this host"
        )
        self.bootstrap_servers = bootstrap_servers
        self.timeout = timeout
        self.reason = reason
