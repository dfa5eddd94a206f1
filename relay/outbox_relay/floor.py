"""The scan floor: an id below which no row can be waiting to be published, now or later.

Claims start at the floor, past the index entries of rows drained since the last VACUUM. The
floor comes from a sample taken once a second (``OutboxSource.sample_floor``: the sequence's
bound, the statements that may hold row ids without a transaction id, the oldest running
transaction and the lowest unpublished id), and only where the previous sample vouches for
every transaction still running; otherwise claims start at the beginning. What a floor cannot
see turns it off for the rest of the run. Why this delays a row at most, never loses it: the
design page, "The scan floor".
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
