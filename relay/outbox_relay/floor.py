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
floor can delay a row, never lose it. (Later rows of their key wait for them: see the claim.)

What the floor cannot see, it detects and then does without: a sample that finds the sequence
lower than the previous one (``ALTER SEQUENCE ... RESTART``, ``TRUNCATE ... RESTART
IDENTITY``, ``setval``), or a new row (not one an operator put back) below the floor in use
(inserted with an id taken earlier, ``OVERRIDING SYSTEM VALUE``), turns the floor off for the
rest of the run, with a log line (``relay.scan_floor_off``). Such a row may have been passed
over for one interval, and a later row of its key sent before it; from then on, claims start at
the beginning.
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
    #: Step 3 also: the lowest id of such a row that was never tried and not put back by an
    #: operator (no ``next_attempt_at``): one that no writer the floor sees can put below it.
    lowest_new: int | None = None


@dataclass
class ScanFloor:
    """The floor, from the samples taken so far; 0 (no floor) until two of them agree."""

    interval: float = FLOOR_EVERY
    value: int = 0
    #: Why the floor is off for good, from a sample that showed a writer it cannot see.
    broken: str = ""
    _previous: FloorSample | None = field(default=None, repr=False)
    _next_sample: float = field(default=0.0, repr=False)

    @property
    def next_sample(self) -> float:
        """When the next sample is due (infinity once the floor is disabled)."""
        return self._next_sample

    @property
    def suspects(self) -> tuple[str, ...]:
        """What the next sample must check again: the last sample's suspects."""
        return self._previous.suspects if self._previous is not None else ()

    def update(self, sample: FloorSample, now: float) -> int:
        """The floor after ``sample``, taken at ``now``; 0 for good once ``broken`` says why."""
        previous, self._previous = self._previous, sample
        self._next_sample = now + self.interval
        self.broken = self._broken(previous, sample)
        if self.broken:
            self.disable()
            return self.value
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

    def _broken(self, previous: FloorSample | None, sample: FloorSample) -> str:
        """Why ``sample`` shows a writer the floor cannot see ("" when it does not)."""
        if previous is not None and 0 < sample.bound < previous.bound:
            return (
                f"the id sequence went back from {previous.bound} to {sample.bound}"
                " (ALTER SEQUENCE RESTART, TRUNCATE RESTART IDENTITY or setval)"
            )
        if self.value and sample.lowest_new is not None and sample.lowest_new < self.value:
            return (
                f"row {sample.lowest_new} was written below the floor {self.value}"
                " (an id taken before its INSERT, OVERRIDING SYSTEM VALUE)"
            )
        return ""

    def disable(self) -> None:
        """No floor, and no more samples (the relay may not read the sequence's bound)."""
        self.value = 0
        self._next_sample = math.inf

    def reset(self) -> None:
        """No floor until two new samples: after a lost connection, start over as at start-up."""
        self.value = 0
        self._previous = None
        self._next_sample = 0.0
