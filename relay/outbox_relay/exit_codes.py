"""What the ``outbox-relay`` exit status means; scripts and orchestrators may rely on these."""

from __future__ import annotations

from enum import IntEnum


class ExitCode(IntEnum):
    OK = 0
    #: An unexpected error; the message and traceback say more.
    FAILURE = 1
    #: Bad arguments or settings (a malformed URL, an invalid schema name...). Click uses 2 too.
    USAGE = 2
    #: The outbox schema is missing, behind, or does not match this version.
    SCHEMA_NOT_CURRENT = 3
    #: PostgreSQL could not be reached (or refused the connection).
    DATABASE_UNAVAILABLE = 4
    #: Kafka could not be reached when the relay started.
    BROKER_UNAVAILABLE = 5
    #: `status --max-lag`: the oldest unpublished event is older than the threshold.
    LAGGING = 6
    #: Nothing matched: no such dead letter, or no retained published rows to replay.
    NOTHING_MATCHED = 7
