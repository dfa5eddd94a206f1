"""How an idle relay learns that events were committed, without costing the writers anything.

No trigger runs in the application's transactions. The idle relay calls ``wait_for_events``
(migration 0005), which sleeps inside PostgreSQL in short ticks and returns once the id
sequence moved past the relay's last :class:`Look` and a row above it is visible, or a late row
(committed below that bound) appears among the 64 highest waiting ones. Below more waiting rows
than that, a late row is found through its writer: the look also names the transactions that
were writing to the outbox table, and the wait returns once one of them has ended. A look is
always read before the claim that follows it, so whatever the claim missed makes the next wait
return. Details and costs: the design page, "How an idle relay wakes up".

Each call also reads when the next event scheduled for later falls due (migration 0009's
``next_due``, after the wait, in the same statement): a wait ends when that event falls due, so
the relay moves it into the outbox then, and an event scheduled while the relay waits is known
at the end of the call (a quarter of a second; longer for a quiet outbox of a frugal relay)
without a statement of its own.
"""

from __future__ import annotations

import math
import time
from collections.abc import Callable
from typing import Any, NamedTuple

import psycopg
import structlog

from outbox.settings import OutboxSettings
from outbox_relay.signals import StopSignal

log = structlog.get_logger("relay.wakeup")

#: The longest tick of an idle wait: the most a lone event waits to be noticed, against the
#: backend's CPU while idle (its cost: the performance page, "Measurements behind the defaults").
MAX_TICK_MS = 6
#: The default ``--idle-tick`` of a relay serving several outboxes (one outbox: ``MAX_TICK_MS``).
FLEET_IDLE_TICK = 0.2
#: How long a wait that follows work ticks every millisecond: at steady low rates the next
#: event is a few milliseconds away (at 200 events/s, 5 ms).
FAST_MS = 20
#: Longest single call; the relay checks for a stop request between calls.
CALL_SECONDS = 0.25
#: How many of the highest waiting rows ``wait_for_events`` compares with the look.
LOOK_DEPTH = 64
#: Longest call while the look has writers to watch: the most a late row below the look's
#: rows waits to be noticed once its transaction commits (the writers are read between calls).
WRITERS_SECONDS = 0.02

# The wait, then (after it, as the subquery reads ``w``) the transactions of other sessions
# that hold the lock every INSERT, COPY, UPDATE and DELETE of the outbox table takes and keeps
# until they end: a transaction holding a row id it has not committed holds it. Read only when
# the fresh look is deeper than the wait reads, or the look had writers (to see which ended).
# pg_locks is readable by every role.
_WAIT = """
SELECT w.woken, w.new_bound, w.new_seen,
       CASE WHEN cardinality(w.new_seen) >= %(depth)s OR cardinality(%(writers)s::text[]) > 0
       THEN ARRAY(SELECT DISTINCT l.virtualtransaction FROM pg_locks AS l
                  WHERE l.locktype = 'relation' AND l.mode = 'RowExclusiveLock'
                    AND l.relation = %(events)s::regclass
                    AND l.pid IS DISTINCT FROM pg_backend_pid()  -- NULL: a prepared one
                    AND l.database = (SELECT oid FROM pg_database
                                      WHERE datname = current_database())
                    AND w.new_seen IS NOT NULL)
       END,
       extract(epoch FROM {next_due}() - clock_timestamp())::float8
FROM {wait}(%(bound)s, %(seen)s::bigint[], %(floor)s, %(timeout_ms)s, %(fast_ms)s,
            %(max_tick_ms)s) AS w
"""


def idle_tick_ms(idle_seconds: float, longest_ms: int) -> int:
    """The longest tick after ``idle_seconds`` without events (pure): 6 ms for the first 6 s,
    then a millisecond per second idle, up to ``longest_ms`` (``--idle-tick``). A lone event
    after a long quiet waits at most a thousandth of that quiet more to be noticed, so that a
    relay watching many quiet outboxes does not pay a busy one's cost for each."""
    return int(max(MAX_TICK_MS, min(longest_ms, idle_seconds)))


class Look(NamedTuple):
    """What the relay had seen at its last look (see the module's docstring)."""

    #: The id sequence's last value; None when the sequence caches ids (no monotonic bound).
    bound: int | None
    #: The ids of the 64 highest unpublished rows up to ``bound``, read after it.
    seen: list[int] | None
    #: With 64 rows in ``seen`` (the wait reads no deeper), the virtual transaction ids of the
    #: sessions writing to the outbox table, read after ``seen``: any row id up to ``bound``
    #: not committed yet is one of theirs. Empty otherwise.
    writers: tuple[str, ...] = ()


class Wakeup:
    """Waits for claimable events on a connection of its own (autocommit)."""

    def __init__(self, settings: OutboxSettings, *, idle_tick: float = MAX_TICK_MS / 1000) -> None:
        self._sql = settings.sql(_WAIT, wait="wait_for_events", next_due="next_due")
        self._events = settings.events_table
        self._look: Look | None = None
        self._polling_reported = False
        self._idle_tick_ms = max(1, round(idle_tick * 1000))
        #: ``--idle-tick`` above its single-outbox default: the relay serves many outboxes and
        #: trades a few milliseconds for CPU: no fast ticks after a batch either (at the rates
        #: one of many outboxes sees, the next event is rarely a few milliseconds away).
        self.frugal = self._idle_tick_ms > MAX_TICK_MS
        #: When events last woke a wait or the relay last sent a batch (``clock``); None until
        #: the first wait.
        self._active_at: float | None = None
        #: When the next scheduled event falls due (``clock``), as the last call read it; None:
        #: nothing is scheduled, or no call read it yet.
        self.due_at: float | None = None

    def expect_due(self, at: float | None) -> None:
        """What the relay's own release found: the next scheduled event falls due ``at``
        (``clock``; None: nothing is scheduled). The next wait ends then, from its start."""
        self.due_at = at

    def active(self, now: float) -> None:
        """The relay sent a batch: the outbox is not quiet."""
        self._active_at = now

    def slowdown(self, now: float) -> float:
        """How many times more slowly a quiet outbox is watched: the longest tick now against
        ``MAX_TICK_MS`` (1 until ``--idle-tick`` lets the tick grow). The relay also spaces its
        polls, scan floor samples and rebalances by it."""
        quiet = 0.0 if self._active_at is None else now - self._active_at
        return idle_tick_ms(quiet, self._idle_tick_ms) / MAX_TICK_MS

    def forget(self) -> None:
        """Start over (a new connection): the next wait takes a look and returns at once."""
        self._look = None

    def wait(
        self,
        conn: psycopg.Connection[Any],
        seconds: float,
        *,
        floor: int,
        stop: StopSignal,
        clock: Callable[[], float] = time.monotonic,
        due_not_before: float = -math.inf,
    ) -> bool:
        """Sleep until events may be waiting, a stop is requested, ``seconds`` pass, or a
        scheduled event falls due (:attr:`due_at`), though not before ``due_not_before`` (the
        caller's next release when due events are left for it: locked, or another relay's).

        Returns True when woken by events. Either way, when it returns without a stop the
        caller claims next, and the look taken last stands for that claim.
        """
        if self._look is None:  # nothing to compare with yet: look now, and claim
            _, self._look, due_in = self._call(conn, Look(None, None), floor, 0, 0, MAX_TICK_MS)
            self.due_at = None if due_in is None else clock() + due_in
            return True
        now = clock()
        deadline = now + seconds
        if self.due_at is not None:  # known already: the first call must not outlast it
            deadline = min(deadline, max(self.due_at, due_not_before))
        if self._active_at is None:
            self._active_at = now
        # The first call only, and only after recent activity: later ones follow a quiet stretch.
        fast_ms = FAST_MS if self.slowdown(now) == 1 and not self.frugal else 0
        while not stop.requested:
            now = clock()
            remaining = deadline - now
            tick_ms = idle_tick_ms(now - self._active_at, self._idle_tick_ms)
            # A quiet outbox's calls last longer too, as its ticks do.
            longest = (
                WRITERS_SECONDS if self._look.writers else CALL_SECONDS * tick_ms / MAX_TICK_MS
            )
            timeout_ms = max(0, round(min(remaining, longest) * 1000))
            woken, fresh, due_in = self._call(conn, self._look, floor, timeout_ms, fast_ms, tick_ms)
            after = clock()
            if woken:
                self._active_at = after
            self.due_at = None if due_in is None else after + due_in
            if self.due_at is not None:  # a scheduled event falls due first: end the wait then
                deadline = min(deadline, max(self.due_at, due_not_before))
            if woken or remaining <= longest or after >= deadline:
                self._look = fresh
                return woken
            fast_ms = 0
        return False

    def _call(
        self,
        conn: psycopg.Connection[Any],
        look: Look,
        floor: int,
        timeout_ms: int,
        fast_ms: int,
        max_tick_ms: int,
    ) -> tuple[bool, Look, float | None]:
        """One call of the wait: whether events woke it, the fresh look, and the seconds until
        the next scheduled event falls due (None: none is scheduled)."""
        params = {
            "bound": look.bound,
            "seen": look.seen,
            "floor": floor,
            "timeout_ms": timeout_ms,
            "fast_ms": fast_ms,
            "max_tick_ms": max_tick_ms,
            "depth": LOOK_DEPTH,
            "writers": list(look.writers),
            "events": self._events,
        }
        row = conn.execute(self._sql, params).fetchone()
        if row is None:  # pragma: no cover - the function always returns one row
            raise RuntimeError("wait_for_events returned no row")
        woken, new_bound, new_seen, writers, due_in = row
        if new_bound is None:
            self._report_polling()
        seen = list(new_seen or ())
        # A writer of the look that is gone has committed (or rolled back) its rows.
        ended = writers is not None and not set(look.writers) <= set(writers)
        deep = len(seen) >= LOOK_DEPTH and writers is not None
        look = Look(new_bound, seen, tuple(writers) if deep else ())
        return bool(woken) or ended, look, due_in

    def _report_polling(self) -> None:
        if not self._polling_reported:
            self._polling_reported = True
            log.warning(
                "relay.wakeup_by_polling",
                reason="the outbox id sequence hands out ids from per-session caches",
                effect="new events wait up to --poll-interval",
                hint="ALTER TABLE <outbox table> ALTER COLUMN id SET CACHE 1",
            )
