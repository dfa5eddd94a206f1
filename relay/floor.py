"""The scan floor: an id below which no row can be waiting to be published, now or later.

PostgreSQL keeps the index entries of deleted rows (and, with ``--retention``, of published
ones) until VACUUM, at the front of the indexes the claim walks in id order. Without a floor
every claim walks past every row drained since the last vacuum: over a 1,000,000-row drain the
claim of 5,000 rows grew from 18 to 26 ms. With one, the claim starts at the floor.

The floor is refreshed from a sample (``OutboxSource.sample_floor``), taken in this order:

1. ``bound``: the id sequence's last value. Every row id handed out later is at least that
   (0, so no floor, when the sequence hands out ids from per-session caches).
2. ``xid``: a transaction id taken for the sample, after ``bound`` was read; in the same
   statement ``oldest_running``, the oldest transaction still running, and ``lowest``, the
   lowest id of an unpublished, not dead-lettered row (any shard, locked or not).

Each INSERT into the outbox takes its transaction id before any row id (migration 0004), so a
transaction whose id is above a sample's ``xid`` holds only row ids of at least that sample's
``bound``. At the next sample, if even the oldest running transaction is younger than the
previous ``xid``, every row not yet visible belongs to such a transaction, and every visible
unpublished row is at least ``lowest``: the floor is the lower of ``lowest`` and the previous
``bound``. Otherwise (a transaction older than that still runs, or there is no previous
sample) there is no floor: the claim starts at the beginning, as it would without one.

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


@dataclass
class ScanFloor:
    """The floor, from the samples taken so far; 0 (no floor) until two of them agree."""

    interval: float = FLOOR_EVERY
    value: int = 0
    _previous: FloorSample | None = field(default=None, repr=False)
    _next_sample: float = field(default=0.0, repr=False)

    def due(self, now: float) -> bool:
        return now >= self._next_sample

    def update(self, sample: FloorSample, now: float) -> int:
        """The floor after ``sample``, taken at ``now``."""
        previous, self._previous = self._previous, sample
        self._next_sample = now + self.interval
        if previous is None or sample.oldest_running <= previous.xid:
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
