"""The scan floor: an id below which no row can be waiting to be published, now or later.

PostgreSQL keeps the index entries of deleted rows (and, with ``--retention``, of published
ones) until VACUUM, at the front of the indexes the claim walks in id order. Without a floor
every claim walks past every row drained since the last vacuum: over a 1,000,000-row drain the
claim of 5,000 rows grew from 18 to 26 ms. With one, the claim starts at the floor.

The floor is refreshed from a sample (``OutboxSource.sample_floor``), taken in this order:

1. ``bound``: the id sequence's last value. Every row id handed out later is above it (0, so no
   floor, when the sequence hands out ids from per-session caches).
2. ``suspects``: the transactions of this database that are running a statement but have no
   transaction id yet (from ``pg_locks`` and ``pg_stat_activity``, readable by every role).
   An INSERT or COPY takes its row ids before its transaction id (when it writes its first row;
   a COPY may buffer up to 1,000 rows first), so such a transaction may hold row ids up to
   ``bound`` that no snapshot shows. Also: whether any of the previous sample's suspects
   still runs.
3. ``xid``: a transaction id taken for the sample; in the same statement ``oldest_running``,
   the oldest transaction still running, and ``lowest``, the lowest id of an unpublished, not
   dead-lettered row (any shard, locked or not).

A transaction that holds a row id of at most the previous ``bound`` and commits after this
sample's snapshot either had a transaction id at the previous sample's step 2 (so below its
``xid``, and it still runs: ``oldest_running`` is at most that ``xid``), or had none: it was then
inside the statement that took the id, so it was one of the previous sample's suspects, and
it still runs. So when neither holds, every row not yet visible has an id above the previous
``bound``, and every visible unpublished row is at least ``lowest``: the floor is the lower of
the two. Otherwise (or with no previous sample) there is no floor: the claim starts at the
beginning, as it would without one. Writers need do nothing for this (no trigger runs on the
write path): a raw INSERT, a COPY, any language or ``session_replication_role`` is covered.
Only a row id taken in an earlier statement than its INSERT (``nextval`` with ``OVERRIDING
SYSTEM VALUE``) escapes it, and such a row may wait up to one interval.

A transaction that runs one statement across two samples (a long report, ``pg_dump``) keeps
the floor off while it runs: claims are then as they were before the floor, slower after big
drains, never wrong.

Rows put back behind the floor (a dead letter retried, published rows replayed) are found by
the next sample, since each one looks at the whole table: they wait at most one interval. So a
floor can delay a row, never lose it.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import NamedTuple

#: Seconds between two samples. Each costs one walk of the unpublished-rows index from its
#: start (the walk a claim would make every time without a floor).
FLOOR_EVERY = 1.0


class FloorSample(NamedTuple):
    """What one sample saw (see the module's docstring)."""

    bound: int
    xid: int
    oldest_running: int
    lowest: int | None
    #: Virtual transaction ids of the suspects found (step 2).
    suspects: tuple[str, ...] = ()
    #: Whether any suspect of the previous sample was still running at step 2.
    suspects_before_running: bool = False


@dataclass
class ScanFloor:
    """The floor, from the samples taken so far; 0 (no floor) until two of them agree."""

    interval: float = FLOOR_EVERY
    value: int = 0
    _previous: FloorSample | None = field(default=None, repr=False)
    _next_sample: float = field(default=0.0, repr=False)

    def due(self, now: float) -> bool:
        return now >= self._next_sample

    @property
    def suspects(self) -> tuple[str, ...]:
        """What the next sample must check again: the last sample's suspects."""
        return self._previous.suspects if self._previous is not None else ()

    def update(self, sample: FloorSample, now: float) -> int:
        """The floor after ``sample``, taken at ``now``."""
        previous, self._previous = self._previous, sample
        self._next_sample = now + self.interval
        if (
            previous is None
            or sample.oldest_running <= previous.xid
            or sample.suspects_before_running
        ):
            self.value = 0
        elif sample.lowest is None:
            self.value = previous.bound
        else:
            self.value = min(sample.lowest, previous.bound)
        return self.value

    def disable(self) -> None:
        """No floor, and no more samples (the relay may not read the sequence's bound)."""
        self.value = 0
        self._next_sample = math.inf

    def reset(self) -> None:
        """No floor until two new samples: after a lost connection, start over as at start-up."""
        self.value = 0
        self._previous = None
        self._next_sample = 0.0
