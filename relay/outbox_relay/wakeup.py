"""How an idle relay learns that events were committed, without costing the writers anything.

No trigger runs in the application's transactions. The idle relay calls ``wait_for_events``
(migration 0005), which sleeps inside PostgreSQL in short ticks and returns once the id
sequence moved past the relay's last :class:`Look` and a row above it is visible, or a late row
(committed below that bound) appears among the highest waiting ones. A look is always read
before the claim that follows it, so whatever the claim missed makes the next wait return.
Details and costs: the design page, "How an idle relay wakes up".
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

#: The longest tick of an idle wait: the most a lone event waits to be noticed, against the
#: backend's CPU while idle (its cost: the performance page, "Measurements behind the defaults").
MAX_TICK_MS = 6
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
