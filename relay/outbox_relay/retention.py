"""The purge of published rows past ``--retention``: a cursor that walks the table in id order.

Rows age past the retention roughly in id order, so each step deletes the expired rows among
the next ``chunk`` from the cursor and stops at the first row published too recently: a pass
reads only the rows near that frontier, never the entries of rows purged before. The cursor
starts over once every ``restart_every`` seconds to find rows it passed while they were
unpublished. Only the owner of shard 0 purges, and each DELETE re-checks ``published_at`` on
its row, so a row ``replay`` put back is kept. More: the design page, "The purge cursor".
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


class PurgeStep(NamedTuple):
    """What one step saw among the ``rows`` rows from the cursor (fewer at the table's end)."""

    rows: int
    #: The highest id among them (None: no row at or after the cursor).
    last_id: int | None
    deleted: int
    #: The lowest id among them published too recently to be purged, if any.
    young: int | None


class PurgeStore(Protocol):
    def purge_chunk(self, from_id: int, rows: int, retention: float) -> PurgeStep:
        """Delete the published rows older than ``retention`` seconds among the ``rows`` rows
        with the lowest ids at or above ``from_id``, and commit."""
        ...


@dataclass
class Purge:
    """The cursor, and the passes that move it (``run``)."""

    retention: float
    chunk: int = PURGE_CHUNK
    budget: float = PURGE_BUDGET
    restart_every: float = PURGE_RESTART
    #: The lowest id the next step looks at.
    cursor: int = field(default=0, init=False)
    _restart_at: float = field(default=0.0, init=False, repr=False)

    def run(self, store: PurgeStore, clock: Callable[[], float]) -> tuple[int, bool]:
        """One pass: steps until the frontier, the end of the table or the budget. Returns the
        rows deleted and whether the pass caught up (False: more is due at once)."""
        started = clock()
        if started >= self._restart_at:
            self.cursor, self._restart_at = 0, started + self.restart_every
        deleted = 0
        while True:
            step = store.purge_chunk(self.cursor, self.chunk, self.retention)
            deleted += step.deleted
            if step.young is not None:
                self.cursor = step.young
                return deleted, True
            if step.last_id is None:
                return deleted, True
            self.cursor = step.last_id + 1
            if step.rows < self.chunk:
                return deleted, True
            if clock() - started >= self.budget:
                return deleted, False

    def start_over(self) -> None:
        """Start the next pass from the lowest id (another relay may have purged meanwhile)."""
        self._restart_at = 0.0
