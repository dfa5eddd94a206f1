"""The purge of published rows past ``--retention``.

A relay with a retention moves each row it publishes to the table of published events,
partitioned by the time of publication (migration 0008). Each pass makes the partitions
``PARTITIONS_AHEAD`` spans ahead of need, and the owner of shard 0 drops those wholly past the
retention: a row is kept at least the retention and at most the retention plus one partition's
span (:func:`partition_span`).

Rows that versions before migration 0008 marked published in place stay in the outbox table
until they expire, and a cursor walks that table in id order to delete them: each step deletes
the expired rows among the next ``chunk`` from the cursor and stops at the first row published
too recently, so a pass reads only the rows near that frontier. The cursor starts over once
every ``restart_every`` seconds to find rows it passed while they were unpublished. Each DELETE
re-checks ``published_at`` on its row, so a row ``replay`` put back is kept. More: the design
page, "Retention".
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from typing import NamedTuple, Protocol

#: Seconds between two passes while the purge is caught up.
PURGE_EVERY = 1.0
#: Rows one step looks at (and at most deletes): one short transaction.
PURGE_CHUNK = 5_000
#: Seconds of steps one pass may take before it lets the relay publish a batch.
PURGE_BUDGET = 0.05
#: Seconds between two starts from the lowest id.
PURGE_RESTART = 60.0
#: Seconds between two walks once a walk found no row marked in place (only relays of versions
#: before migration 0008, still running during an upgrade, mark rows in place).
LEGACY_RECHECK = 600.0
#: How many partitions' spans ahead of now the partitions of published events are made.
PARTITIONS_AHEAD = 4
#: The shortest and longest span of a partition (seconds).
SHORTEST_SPAN, LONGEST_SPAN = 1, 86_400


def partition_span(retention: float) -> int:
    """Seconds one partition of published events spans: an eighth of the retention, in whole
    seconds from 1 s to a day. A row is kept at most the retention plus this; the eighth keeps
    the table within 1.125 times what the retention alone holds."""
    return min(max(round(retention / 8), SHORTEST_SPAN), LONGEST_SPAN)


class PurgeStep(NamedTuple):
    """What one step saw among the ``rows`` rows from the cursor (fewer at the table's end)."""

    rows: int
    #: The highest id among them (None: no row at or after the cursor).
    last_id: int | None
    deleted: int
    #: The lowest id among them published too recently to be purged, if any.
    young: int | None


class Expiry(NamedTuple):
    """What dropping the expired partitions of published events did."""

    partitions: int
    #: Rows of the default partition deleted.
    deleted: int
    #: Seconds the oldest event left is past the retention plus its partition's span (0: none).
    overdue: float


class PurgePass(NamedTuple):
    """What one pass did."""

    #: Rows deleted one by one: marked in place by an earlier version, or in the default
    #: partition.
    deleted: int
    #: Partitions of published events dropped whole.
    partitions: int
    #: False when more is due at once.
    caught_up: bool
    #: Seconds the oldest published event left is past the retention plus its partition's span.
    overdue: float


class PurgeStore(Protocol):
    def prepare_partitions(self, span: float, ahead: float) -> int:
        """Make the partitions of published events up to ``ahead`` seconds from now."""
        ...

    def expire_partitions(self, retention: float) -> Expiry:
        """Drop the partitions past ``retention`` seconds and delete the expired rows of the
        default partition."""
        ...

    def purge_chunk(self, from_id: int, rows: int, retention: float) -> PurgeStep:
        """Delete the published rows older than ``retention`` seconds among the ``rows`` rows
        with the lowest ids at or above ``from_id``, and commit."""
        ...


@dataclass
class Purge:
    """The partitions' upkeep and the cursor, and the passes that move it (``run``)."""

    retention: float
    chunk: int = PURGE_CHUNK
    budget: float = PURGE_BUDGET
    restart_every: float = PURGE_RESTART
    #: Seconds before a walk that found no row marked in place looks again.
    recheck_every: float = LEGACY_RECHECK
    #: The lowest id the next step looks at.
    cursor: int = field(default=0, init=False)
    _restart_at: float = field(default=0.0, init=False, repr=False)
    #: Whether the walk goes on, and whether it found any row marked in place since it began.
    _walking: bool = field(default=True, init=False, repr=False)
    _found: bool = field(default=False, init=False, repr=False)

    @property
    def span(self) -> int:
        return partition_span(self.retention)

    def prepare(self, store: PurgeStore) -> int:
        """Make the partitions ahead of need (every relay with a retention does, so rows find
        one even while the purging relay is away); how many were made."""
        return store.prepare_partitions(self.span, self.span * PARTITIONS_AHEAD)

    def run(self, store: PurgeStore, clock: Callable[[], float]) -> PurgePass:
        """One pass of the purging relay: the partitions made and dropped, then cursor steps
        until the frontier, the end of the table or the budget."""
        started = clock()
        self.prepare(store)
        expiry = store.expire_partitions(self.retention)
        deleted = expiry.deleted
        if started >= self._restart_at:
            self.cursor, self._restart_at = 0, started + self.restart_every
            self._walking, self._found = True, False
        while self._walking:
            step = store.purge_chunk(self.cursor, self.chunk, self.retention)
            deleted += step.deleted
            self._found = self._found or bool(step.deleted) or step.young is not None
            if step.young is not None:
                self.cursor = step.young
                break
            if step.last_id is None or step.rows < self.chunk:
                if step.last_id is not None:
                    self.cursor = step.last_id + 1
                if not self._found:  # no row marked in place: look again much later
                    self._walking, self._restart_at = False, started + self.recheck_every
                break
            self.cursor = step.last_id + 1
            if clock() - started >= self.budget:
                return PurgePass(deleted, expiry.partitions, False, expiry.overdue)
        return PurgePass(deleted, expiry.partitions, True, expiry.overdue)

    def start_over(self) -> None:
        """Start the next pass from the lowest id (another relay may have purged meanwhile)."""
        self._restart_at = 0.0
