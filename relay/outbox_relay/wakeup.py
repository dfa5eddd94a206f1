"""How an idle relay learns that events were committed, without costing the writers anything.

No trigger runs in the application's transactions (a NOTIFY at commit serializes every writer's
commit behind one database-wide lock). Instead the idle relay calls ``wait_for_events``
(migration 0005), which sleeps inside PostgreSQL in ticks of 1 ms (for ``FAST_MS`` after a
batch, when the next event may be close), then doubling up to ``MAX_TICK_MS``, and returns as
soon as

* the id sequence moved past the bound of the relay's last look and a row above it has
  become visible (new rows), or
* the 64 highest unpublished rows between the scan floor and that bound include one the look
  did not (late rows: a row id is taken before its transaction commits, so rows do not become
  visible in id order). Checked only in ticks after some transaction ended, so an idle database
  costs nothing more; only 64 rows, so many rows waiting behind a failed one cost no more.

A look (:class:`Look`) is the sequence's last value, then the ids of those rows, read in that
order and always *before* the claim that follows it: whatever that claim did not see is then
either above the bound or missing from the look. A claim made without a wait in between keeps
the older look, which can only make the next wait return sooner.

Each call lasts at most ``CALL_SECONDS``, so a stop request waits at most that long, and the
call never holds a snapshot long enough to matter to VACUUM or to the scan floor.
"""

from __future__ import annotations

import time
from collections.abc import Callable
from typing import Any, NamedTuple

import psycopg
import structlog

from outbox.settings import OutboxSettings
from outbox_relay.signals import StopSignal

log = structlog.get_logger("relay.wakeup")

#: The longest tick of an idle wait: the most a lone event waits to be noticed. A tick costs the
#: backend 50-100 us here, mostly the sleep and wake-up themselves: measured over an idle minute
#: (bench/idle.py), the relay process took 0.27% of a core and its three backends 1.1%.
MAX_TICK_MS = 8
#: How long a wait that follows work ticks every millisecond: at steady low rates the next
#: event is a few milliseconds away (at 200 events/s, 5 ms).
FAST_MS = 20
#: Longest single call; the relay checks for a stop request between calls.
CALL_SECONDS = 0.25


class Look(NamedTuple):
    """What the relay had seen at its last look (see the module's docstring)."""

    #: The id sequence's last value; None when the sequence caches ids (no monotonic bound).
    bound: int | None
    #: The ids of the 64 highest unpublished rows up to ``bound``, read after it.
    seen: list[int] | None


class Wakeup:
    """Waits for claimable events on a connection of its own (autocommit)."""

    def __init__(self, settings: OutboxSettings) -> None:
        self._sql = settings.sql(
            "SELECT * FROM {wait}(%s, %s::bigint[], %s, %s, %s, %s)", wait="wait_for_events"
        )
        self._look: Look | None = None
        self._polling_reported = False

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
    ) -> bool:
        """Sleep until events may be waiting, a stop is requested, or ``seconds`` pass.

        Returns True when woken by events. Either way, when it returns without a stop the
        caller claims next, and the look taken last stands for that claim.
        """
        if self._look is None:  # nothing to compare with yet: look now, and claim
            self._look = self._call(conn, Look(None, None), floor, 0, 0)[1]
            return True
        deadline = clock() + seconds
        fast_ms = FAST_MS  # the first call only: later ones follow a quiet stretch
        while not stop.requested:
            remaining = deadline - clock()
            timeout_ms = max(0, round(min(remaining, CALL_SECONDS) * 1000))
            woken, fresh = self._call(conn, self._look, floor, timeout_ms, fast_ms)
            if woken or remaining <= CALL_SECONDS:
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
    ) -> tuple[bool, Look]:
        params = (look.bound, look.seen, floor, timeout_ms, fast_ms, MAX_TICK_MS)
        row = conn.execute(self._sql, params).fetchone()
        if row is None:  # pragma: no cover - the function always returns one row
            raise RuntimeError("wait_for_events returned no row")
        woken, new_bound, new_seen = row
        if new_bound is None:
            self._report_polling()
        return bool(woken), Look(new_bound, list(new_seen or ()))

    def _report_polling(self) -> None:
        if not self._polling_reported:
            self._polling_reported = True
            log.warning(
                "relay.wakeup_by_polling",
                reason="the outbox id sequence hands out ids from per-session caches",
                effect="new events wait up to --poll-interval",
                hint="ALTER TABLE <outbox table> ALTER COLUMN id SET CACHE 1",
            )
