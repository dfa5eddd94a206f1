"""The relay's periodic chores, each a task of the loop's :class:`~.schedule.Schedule`.

Rebalancing the shards, releasing scheduled events that fell due, purging published rows past
their retention, refreshing the backlog gauges, sampling the scan floor and logging progress.
Each returns when it is next due. They use the pipeline's current ``source`` connection, so the
loop runs them only while that connection holds no claim.

The release, the purge and the gauges are housekeeping: when one fails and the connection is
still good (a statement or lock timeout, a missing privilege), the chore logs
``relay.chore_failed``, rolls back and tries again later, and the claims go on. Only a broken
connection is an outage.
"""

from __future__ import annotations

import functools
import math
from collections.abc import Callable
from dataclasses import dataclass

import psycopg
import structlog

from outbox.errors import one_line
from outbox_relay.config import RelaySettings
from outbox_relay.floor import ScanFloor
from outbox_relay.pipeline import Pipeline
from outbox_relay.ports import Metrics
from outbox_relay.retention import PURGE_EVERY, Purge
from outbox_relay.schedule import Schedule, Task
from outbox_relay.shards import ShardOwner

log = structlog.get_logger("relay.loop")

#: How often progress is logged (seconds).
PROGRESS_EVERY = 10.0
#: The shard whose owner purges published rows past their retention (one relay at a time).
PURGING_SHARD = 0
#: How often the backlog gauges are refreshed when metrics are enabled (seconds).
BACKLOG_EVERY = 5.0
#: Seconds before a housekeeping chore that failed is tried again.
CHORE_RETRY = 30.0
#: The longest a busy relay goes without releasing due scheduled events (seconds; times the
#: quiet slowdown): a writer may schedule a row due sooner than the next due time the relay
#: knew. An idle relay learns of it sooner, at the end of a call of its wait (``.wakeup``),
#: which then ends when the row falls due; so the release does not end waits itself.
RELEASE_LOOK = 1.0
#: Seconds before a release that left due rows behind tries again (a row was locked: a
#: ``cancel`` not committed yet; or another relay was releasing), doubling while it does, up to
#: ``RELEASE_LOOK``: a ``cancel`` left open does not keep the relay busy.
RELEASE_SOON = 0.05


@dataclass
class Totals:
    """What one relay did since it started, for its progress lines and ``relay.drained``."""

    published: int = 0
    dead_lettered: int = 0
    purged: int = 0
    partitions_dropped: int = 0


@dataclass
class Chores:
    """The periodic work around the batches; :meth:`schedule` makes it the loop's tasks."""

    settings: RelaySettings
    batches: Pipeline
    shards: ShardOwner
    floor: ScanFloor
    metrics: Metrics
    totals: Totals
    clock: Callable[[], float]
    #: Deletes published rows past ``--retention`` (None: they are deleted on publish).
    purge: Purge | None = None
    #: How many times more slowly the outbox is watched while quiet (``Wakeup.slowdown``):
    #: its rebalances are spaced by it.
    slowdown: Callable[[float], float] = lambda _now: 1.0
    #: How many ``FLOOR_EVERY`` apart the floor's samples are (``Relay._floor_spacing``).
    floor_spacing: Callable[[float], float] = lambda _now: 1.0
    #: Told, after each release, when the next scheduled event falls due (the loop's clock;
    #: None: none is, or another relay's turn): ``Wakeup.expect_due``, so that a wait begun
    #: after a release ends when the next event falls due, not at the end of its first call.
    expect_due: Callable[[float | None], None] = lambda _at: None
    _published_at_progress: int = 0
    #: While due rows are left for the next release (locked, or another relay's turn): when it
    #: runs, before which finding them due must not end a wait (``Wakeup.wait``). -inf: none.
    release_hold: float = -math.inf
    _release_backoff: float = RELEASE_SOON

    def schedule(self) -> Schedule:
        """The tasks; a rebalance and a purge pass end a wait when due (a release, when its
        events fall due: ``Wakeup.wait``)."""
        tasks = [
            Task("rebalance", self.rebalance, ends_wait=True),
            Task("release", self.housekeeping("release", self.release_due)),
        ]
        if self.purge is not None:
            purge = functools.partial(self.purge_pass, self.purge)
            tasks.append(Task("purge", self.housekeeping("purge", purge), ends_wait=True))
        if self.metrics.wants_backlog:
            tasks.append(Task("backlog", self.housekeeping("backlog", self.refresh_backlog)))
        tasks += [Task("floor", self.sample_floor), Task("progress", self.log_progress)]
        return Schedule(tasks)

    def housekeeping(self, name: str, chore: Callable[[float], float]) -> Callable[[float], float]:
        """``chore``, failing alone: an error that leaves the connection good is logged and the
        chore is due again in ``CHORE_RETRY`` seconds; a broken connection is the loop's."""

        def run(now: float) -> float:
            try:
                return chore(now)
            except psycopg.Error as exc:
                connection = self.batches.source.connection
                if connection.broken or connection.closed:
                    raise
                connection.rollback()
                log.warning(
                    "relay.chore_failed",
                    chore=name,
                    error=one_line(exc),
                    retry_in=CHORE_RETRY,
                    hint="publishing goes on; the chore is tried again later",
                )
                return now + CHORE_RETRY

        return run

    def rebalance(self, now: float) -> float:
        acquired, released = self.shards.rebalance()
        self.metrics.set_shards_owned(len(self.shards.owned))
        if acquired or released:
            log.info(
                "shards.rebalanced",
                owned=len(self.shards.owned),
                acquired=len(acquired),
                released=len(released),
            )
        waiting = self.shards.handover.waiting()
        if acquired and waiting > 0:
            held = len(self.shards.owned - self.shards.ownership.shards)
            log.info("shards.held_for_gone_relay", shards=held, seconds=round(waiting, 1))
        # A quiet outbox rebalances more slowly too; events bring the next one forward.
        return now + self.settings.rebalance_interval * self.slowdown(now)

    def release_due(self, now: float) -> float:
        """Move the scheduled events that fell due into the outbox; due again at once after a
        full batch, else when the next one falls due, and within ``RELEASE_LOOK`` anyway; when
        due rows were left behind, after a backoff (``RELEASE_SOON``, doubling).

        Any relay of the outbox releases, whatever shards it owns: no relay has to be there or
        take over for events to fall due, and a release already under way elsewhere makes the
        others skip their turn (``OutboxSource.release_due``), so batches never interleave.
        """
        batch = self.settings.batch_size
        self.release_hold = now + CHORE_RETRY  # stands if it fails: housekeeping retries then
        done = self.batches.source.release_due(batch)
        self.expect_due(None if done.next_due_in is None else now + done.next_due_in)
        if done.released >= batch:
            self._hold(None)
            return now
        if not done.mine or (done.next_due_in is not None and done.next_due_in <= 0):
            return self._hold(now + self._release_backoff)  # due rows left for later
        self._hold(None)
        look = RELEASE_LOOK * self.slowdown(now)
        if done.next_due_in is None:
            return now + look
        return now + min(look, done.next_due_in)

    def _hold(self, until: float | None) -> float:
        """Record whether due rows wait for the release at ``until`` (None: none do)."""
        if until is None:
            self.release_hold, self._release_backoff = -math.inf, RELEASE_SOON
            return -math.inf
        self.release_hold = until
        self._release_backoff = min(RELEASE_LOOK, 2 * self._release_backoff)
        return until

    def purge_pass(self, purge: Purge, now: float) -> float:
        """A pass of the purge, by the owner of ``PURGING_SHARD`` only; due again at once
        while it is behind."""
        if PURGING_SHARD not in self.shards.owned:
            purge.start_over()  # when it is ours again, others will have moved on
            purge.prepare(self.batches.source)
            self.metrics.partitions_dropped(0, overdue=0.0)  # the purging relay reports it
            return now + PURGE_EVERY
        done = purge.run(self.batches.source, self.clock)
        self.totals.purged += done.deleted
        self.totals.partitions_dropped += done.partitions
        self.metrics.purged(done.deleted)
        self.metrics.partitions_dropped(done.partitions, overdue=done.overdue)
        if done.partitions:
            log.info("relay.partitions_dropped", partitions=done.partitions)
        return now + PURGE_EVERY if done.caught_up else now

    def refresh_backlog(self, now: float) -> float:
        source = self.batches.source
        self.metrics.set_backlog(*source.backlog())
        self.metrics.set_scheduled(*source.scheduled())
        return now + BACKLOG_EVERY

    def sample_floor(self, now: float) -> float:
        try:
            self.floor.update(self.batches.source.sample_floor(self.floor.suspects), now)
            if self.floor.broken:
                log.warning(
                    "relay.scan_floor_off",
                    error=self.floor.broken,
                    hint="claims start at the beginning until the relay restarts; a row may"
                    " have waited one second, and a later row of its key gone first",
                )
        except psycopg.errors.InsufficientPrivilege as exc:
            # Claims still work, from the start of the index: slower after big drains, no less.
            function = self.settings.outbox.qualified("last_id")
            log.warning(
                "relay.scan_floor_off",
                error=one_line(exc),
                hint=f"grant the relay's role EXECUTE on {function}()",
            )
            self.floor.disable()
        due = self.floor.next_sample
        return due if math.isinf(due) else now + (due - now) * self.floor_spacing(now)

    def log_progress(self, now: float) -> float:
        totals = self.totals
        if totals.published != self._published_at_progress:
            log.info(
                "relay.progress",
                published=totals.published,
                published_since_last=totals.published - self._published_at_progress,
                dead_lettered=totals.dead_lettered,
                purged=totals.purged,
                partitions_dropped=totals.partitions_dropped,
                shards=len(self.shards.owned),
            )
            self._published_at_progress = totals.published
        return now + PROGRESS_EVERY
