"""What the relay loop talks to: rows claimed from the outbox, outcomes of their delivery.

The loop (``.loop``) sees only these types and Protocols; the PostgreSQL and Kafka adapters
(``.claims``, ``.shards``, ``.kafka``) implement them.
"""

from __future__ import annotations

import enum
from collections.abc import Callable, Sequence
from typing import TYPE_CHECKING, NamedTuple, Protocol

if TYPE_CHECKING:
    from outbox_relay.backoff import BreakerState


class ClaimedRow(NamedTuple):
    """An outbox row locked by the current claim transaction.

    A named tuple, not a dataclass: one is built per row at the relay's full rate, and a tuple
    is the cheapest immutable record Python has.
    """

    id: int
    event_id: str
    topic: str
    key: bytes | None
    payload: bytes
    #: The event's own headers, as two parallel sequences (as stored).
    header_names: Sequence[str]
    header_values: Sequence[bytes]
    attempts: int

    @property
    def headers(self) -> list[tuple[str, bytes]]:
        """The event's own headers, as (name, value) pairs."""
        return list(zip(self.header_names, self.header_values, strict=True))


class Ownership(NamedTuple):
    """Which rows a claim may take: those of ``shards``, as long as the ownership session that
    holds their advisory locks is alive, which its membership lock (``member_class``,
    ``member_id``, held by that session alone) proves."""

    shards: frozenset[int]
    member_class: int
    member_id: int


class Result(enum.Enum):
    DELIVERED = "delivered"  # Kafka acknowledged it: mark it published
    RETRY = "retry"  # the row failed (e.g. unknown topic): count an attempt, back off
    PERMANENT = "permanent"  # retrying cannot help (too large, invalid topic): dead-letter now
    BROKER = "broker"  # the broker, not the row, failed: no attempt counted, the breaker decides
    NOT_SENT = "not_sent"  # held back (an earlier row of its key failed) or no report in time


class Outcome(NamedTuple):
    """What became of one row of a batch (a named tuple: one per row, at the full rate)."""

    row_id: int
    result: Result
    error: str = ""


class Publisher(Protocol):
    def publish(
        self, rows: Sequence[ClaimedRow], *, should_abort: Callable[[], bool]
    ) -> list[Outcome]:
        """Send every row, wait for each one's delivery report (bounded), one outcome per row."""
        ...

    def settle(self, timeout: float) -> bool:
        """Make sure nothing sent so far can reach Kafka later: drop what was not sent yet,
        wait up to ``timeout`` seconds for what is in flight. Whether nothing is left."""
        ...


class Metrics(Protocol):
    """What the loop of one outbox reports: implemented by ``.metrics.OutboxMetrics`` (its
    Prometheus series, labelled with the outbox's name, and its part of the health probes) and
    by ``NoMetrics`` (without ``--metrics-port``)."""

    #: Whether the backlog gauges are worth a query every few seconds.
    wants_backlog: bool

    def beat(self) -> None:
        """The loop is alive."""

    def database_ok(self, ok: bool) -> None:
        """Whether the loop's last database operation succeeded."""

    def schema_checked(self) -> None:
        """The schema was found current at start."""

    def outbox_up(self, up: bool) -> None:
        """Whether the outbox is served: its database answers and its schema is current
        (False while it fails and is retried)."""

    def observe_batch(
        self, rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome], seconds: float
    ) -> None: ...

    def set_backlog(self, events: int, oldest_age: float) -> None: ...

    def set_scheduled(self, events: int, next_due: float | None) -> None:
        """Scheduled events waiting to fall due, and the next one's due time (unix seconds;
        None when nothing is scheduled)."""

    def dead_lettered(self, count: int) -> None: ...

    def purged(self, count: int) -> None: ...

    def partitions_dropped(self, count: int, *, overdue: float) -> None: ...

    def set_breaker(self, state: BreakerState) -> None: ...

    def set_shards_owned(self, count: int) -> None: ...


class NoMetrics:
    """Metrics that are off: every report is dropped."""

    wants_backlog = False

    def beat(self) -> None:
        pass

    def database_ok(self, ok: bool) -> None:
        pass

    def schema_checked(self) -> None:
        pass

    def outbox_up(self, up: bool) -> None:
        pass

    def observe_batch(
        self, rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome], seconds: float
    ) -> None:
        pass

    def set_backlog(self, events: int, oldest_age: float) -> None:
        pass

    def set_scheduled(self, events: int, next_due: float | None) -> None:
        pass

    def dead_lettered(self, count: int) -> None:
        pass

    def purged(self, count: int) -> None:
        pass

    def partitions_dropped(self, count: int, *, overdue: float) -> None:
        pass

    def set_breaker(self, state: BreakerState) -> None:
        pass

    def set_shards_owned(self, count: int) -> None:
        pass
