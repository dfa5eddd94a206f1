"""The batch pipeline: claim, publish, record the outcomes; the next batch claimed meanwhile.

Why the next batch is claimed while the current one is published: the database step and the
Kafka step then overlap instead of taking turns (the claim runs on a second connection, in a
thread; psycopg waits for the server without the GIL). Batches are still *sent* one after the
other and *marked* one after the other, so the guarantees above are unchanged: the next batch's
rows of a key the current batch failed to deliver are held back (not sent, no attempt counted),
and a failure of the current batch's marking discards the prefetched claim with it.
"""

from __future__ import annotations

import contextlib
from collections.abc import Callable, Sequence
from concurrent.futures import Future, ThreadPoolExecutor

import psycopg

from outbox_relay.backoff import full_jitter
from outbox_relay.claims import Failure, OutboxSource, plan_failures
from outbox_relay.config import RelaySettings
from outbox_relay.pg import DatabaseUnavailableError
from outbox_relay.ports import ClaimedRow, Outcome, Ownership, Publisher, Result

#: Ids of a batch's undelivered rows, by key.
Undelivered = dict[bytes, list[int]]


def undelivered_by_key(rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome]) -> Undelivered:
    """The keyed rows of a batch that were not delivered (pure)."""
    undelivered: Undelivered = {}
    for row, outcome in zip(rows, outcomes, strict=True):
        if row.key is not None and outcome.result is not Result.DELIVERED:
            undelivered.setdefault(row.key, []).append(row.id)
    return undelivered


def filled(rows: Sequence[ClaimedRow], limit: int, max_bytes: int) -> bool:
    """Whether a claimed batch was cut by the row limit or the byte budget (so more rows may
    be waiting), rather than holding every deliverable row. The claim stops before the first
    row whose predecessors' payloads reach ``max_bytes``, so a batch cut by bytes carries at
    least that many (unless the per-key check dropped some of them: then the next batch is
    claimed afterwards instead of meanwhile, which is slower, never wrong)."""
    return len(rows) >= limit or sum(len(row.payload) for row in rows) >= max_bytes


def held_back(rows: Sequence[ClaimedRow], undelivered: Undelivered) -> set[int]:
    """Rows of the next batch that must not be sent: those with an earlier undelivered row of
    their key that is not in this batch (pure). An undelivered row claimed again in this batch
    goes first, in id order, so the rows after it may follow."""
    if not undelivered:
        return set()
    ids = {row.id for row in rows}
    return {
        row.id
        for row in rows
        if row.key is not None
        and any(earlier < row.id and earlier not in ids for earlier in undelivered.get(row.key, ()))
    }


class Pipeline:
    """One batch after another on two work connections: ``source`` holds the batch being
    published (and runs the chores between batches), ``_spare`` claims the next one in a
    thread meanwhile."""

    def __init__(self, settings: RelaySettings, publisher: Publisher) -> None:
        self.settings = settings
        self.publisher = publisher
        self.source = OutboxSource(settings)
        self._spare = OutboxSource(settings)
        self._claimer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="relay-claim")
        #: The next batch being claimed on ``_spare`` while the current one is published.
        self._prefetch: Future[list[ClaimedRow]] | None = None
        #: Ids of the rows of the batch just finished that were not delivered, by key: the next
        #: batch was claimed before those outcomes were recorded, so it may hold later rows of
        #: those keys, which must wait.
        self._undelivered: Undelivered = {}

    @property
    def prefetching(self) -> bool:
        return self._prefetch is not None

    def connect(self) -> None:
        """Open ``source``; the spare connection opens at the first prefetch (``rest`` closes
        it), so an idle outbox costs PostgreSQL one work session, not two."""
        self.source.connect()

    def take(
        self, limit: int, *, ownership: Ownership, floor: int, stopping: Callable[[], bool]
    ) -> tuple[list[ClaimedRow], Undelivered]:
        """The prefetched batch if there is one (making its connection the current one), else a
        fresh claim; with the keys to hold back in it. ``stopping`` is asked once the prefetched
        claim is in, so a stop requested while it ran gives its rows back unsent."""
        held, self._undelivered = self._undelivered, {}
        pending, self._prefetch = self._prefetch, None
        if pending is not None:
            rows = pending.result()  # a database error surfaces here, and is recovered from
            self.source, self._spare = self._spare, self.source
            if len(rows) <= limit and not stopping():
                return rows, held
            self.source.release()  # the breaker now asks for a probe: claim that instead
        if stopping():
            return [], {}
        rows = self.source.claim(limit, ownership=ownership, floor=floor)
        return rows, {}  # claimed after the last batch was recorded: nothing to hold back

    def prefetch(
        self, limit: int, *, ownership: Ownership, floor: int, in_flight: list[int]
    ) -> None:
        """Claim the next batch on the spare connection while ``in_flight`` is published (or
        not, when the spare cannot connect: the next batch is then claimed after this one)."""
        spare = self._spare
        if not spare.connected:
            try:
                spare.connect()
            except DatabaseUnavailableError:
                return
        self._prefetch = self._claimer.submit(
            lambda: spare.claim(limit, ownership=ownership, in_flight=in_flight, floor=floor)
        )

    def drop_prefetch(self) -> None:
        """Give back a prefetched batch unsent (its rows are simply unlocked)."""
        pending, self._prefetch = self._prefetch, None
        if pending is not None:
            with contextlib.suppress(psycopg.Error):  # the connection is gone: so are the locks
                pending.result()
                self._spare.release()

    def publish(
        self,
        rows: Sequence[ClaimedRow],
        undelivered: Undelivered,
        *,
        should_abort: Callable[[], bool],
    ) -> tuple[list[Outcome], bool]:
        """Every row's outcome, and whether any row was handed to the publisher at all."""
        held = held_back(rows, undelivered)
        if not held:
            return self.publisher.publish(rows, should_abort=should_abort), True
        sendable = [row for row in rows if row.id not in held]
        sent = self.publisher.publish(sendable, should_abort=should_abort) if sendable else []
        by_id = {outcome.row_id: outcome for outcome in sent}
        outcomes = [
            by_id.get(row.id)
            or Outcome(row.id, Result.NOT_SENT, "an earlier row of its key was not delivered")
            for row in rows
        ]
        return outcomes, bool(sendable)

    def record(
        self, rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome]
    ) -> tuple[list[int], list[Failure]]:
        """Mark the delivered rows published, record the failures, commit; returns both."""
        delivered = [o.row_id for o in outcomes if o.result is Result.DELIVERED]
        everything_delivered = len(delivered) == len(rows)  # the common case: nothing to plan
        failures = (
            []
            if everything_delivered
            else plan_failures(
                rows,
                outcomes,
                max_attempts=self.settings.max_attempts,
                delay_for=lambda attempt: full_jitter(
                    attempt, base=self.settings.backoff_base, cap=self.settings.backoff_cap
                ),
            )
        )
        self.source.finish(delivered, failures)
        if self._prefetch is not None and not everything_delivered:
            self._undelivered = undelivered_by_key(rows, outcomes)
        return delivered, failures

    def rest(self) -> None:
        """Close the spare connection while nothing is prefetched (an idle outbox)."""
        if self._prefetch is None and self._spare.connected:
            for close in (self._spare.release, self._spare.close):
                with contextlib.suppress(psycopg.Error):
                    close()

    def close(self) -> None:
        """Give back the prefetched batch and close both connections (already gone is fine)."""
        self.drop_prefetch()
        self._undelivered = {}
        for close in (
            self.source.release,
            self.source.close,
            self._spare.release,
            self._spare.close,
        ):
            with contextlib.suppress(psycopg.Error):
                close()

    def shutdown(self) -> None:
        """Stop the claim thread (after ``close``)."""
        self._claimer.shutdown(wait=True)
