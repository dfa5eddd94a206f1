"""The relay loop: claim a batch, publish it, record the outcomes; wait when there is nothing.

A row is marked published only after Kafka acknowledged it, in the batch's own transaction: a
relay that dies mid-batch sends the batch again (duplicates, never a loss). Why this order, and
which rows count as acknowledged: the design page, "Marking comes after the ack".
"""

from __future__ import annotations

import contextlib
import math
import select
import time
from collections.abc import Callable, Iterator, Sequence
from typing import TYPE_CHECKING

import psycopg
import structlog

from outbox import migrator
from outbox.errors import ConfigurationError, one_line
from outbox_relay.backoff import CircuitBreaker
from outbox_relay.chores import Chores, Totals
from outbox_relay.claims import OutboxSource
from outbox_relay.config import RelaySettings
from outbox_relay.floor import FLOOR_EVERY, ScanFloor
from outbox_relay.outage import BreakerReport
from outbox_relay.pipeline import Pipeline, Undelivered, filled
from outbox_relay.ports import ClaimedRow, Metrics, NoMetrics, Outcome, Publisher, Result
from outbox_relay.recovery import reconnect
from outbox_relay.retention import Purge
from outbox_relay.shards import ShardOwner
from outbox_relay.signals import StopSignal
from outbox_relay.wakeup import Wakeup

if TYPE_CHECKING:
    from outbox_relay.metrics import RelayMetrics

log = structlog.get_logger("relay.loop")

#: Seconds without a batch after which the relay closes its spare work connection (opened
#: again by the next prefetch): an idle outbox holds two sessions, not three.
SPARE_REST = 30.0
#: A frugal relay's floor samples are at least this many ``FLOOR_EVERY`` apart unless draining.
FRUGAL_FLOOR_SPACING = 10.0


class Relay:
    """One relay process: owns shards, claims their rows, publishes them, records outcomes."""

    def __init__(
        self,
        settings: RelaySettings,
        publisher: Publisher,
        stop: StopSignal,
        *,
        clock: Callable[[], float] = time.monotonic,
        metrics: Metrics | None = None,
    ) -> None:
        self.settings = settings
        #: Prometheus metrics and health state (--metrics-port), or metrics that are off.
        self.metrics: Metrics = metrics if metrics is not None else NoMetrics()
        self.publisher = publisher
        self.stop = stop
        self.clock = clock
        #: Claim, publish, record, with the next batch claimed meanwhile (outbox_relay/pipeline.py).
        self.batches = Pipeline(settings, publisher)
        self.shards = ShardOwner(settings)
        #: Sleeps on the ownership connection until events may be waiting.
        self.wakeup = Wakeup(settings.outbox, idle_tick=settings.idle_tick)
        #: Whether the last wait ended because events may be waiting (``step`` claims first).
        self._woken = False
        #: Where claims start their index scan (see ``outbox_relay.floor``).
        self.floor = ScanFloor()
        self.breaker = CircuitBreaker(
            threshold=settings.breaker_threshold,
            cooldown=settings.breaker_cooldown,
            max_cooldown=settings.breaker_max_cooldown,
            probe_size=settings.probe_size,
            clock=clock,
        )
        self.totals = Totals()
        #: Rebalance, purge, gauges, floor samples and progress lines, each when due.
        self._chores = Chores(
            settings,
            self.batches,
            self.shards,
            self.floor,
            self.metrics,
            self.totals,
            clock,
            purge=Purge(settings.retention) if settings.retention else None,
            slowdown=self.wakeup.slowdown,
            floor_spacing=self._floor_spacing,
            expect_due=self.wakeup.expect_due,
        )
        self.chores = self._chores.schedule()
        #: The breaker's changes, as log lines and its gauge.
        self.outage = BreakerReport(self.breaker, self.metrics)
        #: When the first batch's claim began and the last batch committed (``clock``): what
        #: ``relay.drained`` reports when ``exit_when_idle`` ends the run.
        self._first_claim_at: float | None = None
        #: Whether the last batch was cut by a limit (more rows were waiting).
        self._draining = False
        self._last_commit_at: float | None = None

    def connect(self) -> None:
        """Open the work connection(s) and the ownership one; raises when PostgreSQL is
        unreachable."""
        self.batches.connect()
        self.shards.connect()
        self.wakeup.forget()
        self._woken = False
        self.chores.make_due("rebalance")
        self.metrics.database_ok(True)

    def start(self) -> None:
        """Connect, and check what publishing needs: raises when PostgreSQL is unreachable, the
        schema is not current, or the relay's role may not record what it publishes."""
        self.connect()
        migrator.require_current(self.batches.source.connection, self.settings.outbox)
        require_privileges(self.batches.source, self.settings)
        self.metrics.schema_checked()
        self.batches.source.release()

    def run(self) -> None:
        """Loop until a stop is requested (signal, or idle with ``exit_when_idle``)."""
        log.info("relay.started", batch_size=self.settings.batch_size, member=self.shards.member_id)
        while not self.stop.requested:
            try:
                self.step()
            except psycopg.Error as exc:
                self._recover_database(exc)
            else:
                self.metrics.database_ok(True)
            self.metrics.beat()
        log.info("relay.stopping", reason=self.stop.reason, published=self.totals.published)

    def step(self) -> None:
        """One pass: the chores that are due (rebalance, purge, gauges, the scan floor), then one
        batch or one wait. When events just woke the relay, the batch goes first and the chores
        follow it: they can wait one batch, a lone event's latency cannot."""
        woken, self._woken = self._woken, False
        if not woken:
            self.chores.run_due(self.clock())
        allowed = self.breaker.allow()
        self.outage.gauge()
        if not allowed:
            self.batches.drop_prefetch()
            self._pause(min(self.breaker.seconds_until_probe(), self.settings.poll_interval))
            return
        limit = self.breaker.batch_limit(self.settings.batch_size)
        started = self.clock()
        rows, held = self.batches.take(
            limit,
            ownership=self.shards.ownership,
            floor=self.floor.value,
            stopping=lambda: self.stop.requested,
        )
        if rows:
            self._send(rows, held, limit=limit, started=started, woken=woken)
        else:
            self._idle(woken)

    def _floor_spacing(self, now: float) -> float:
        """How many times ``FLOOR_EVERY`` apart the floor's samples are: more while the outbox
        is quiet; for a frugal relay (``Wakeup.frugal``), 10 at least unless it is draining (a
        sample reads ``pg_locks``, 6 ms with 50 outboxes on the server, and a floor a few
        seconds old costs a claim that keeps up only a few more dead index entries)."""
        slowdown = self.wakeup.slowdown(now)
        if self.wakeup.frugal and not self._draining:
            return max(FRUGAL_FLOOR_SPACING, slowdown)
        return slowdown

    def _idle(self, woken: bool) -> None:
        """Nothing was claimed: the chores a wake-up put off, then exit (--exit-when-idle) or
        wait."""
        self.batches.source.release()
        if self._last_commit_at is None or self.clock() - self._last_commit_at > SPARE_REST:
            self.batches.rest()
        if woken:
            self.chores.run_due(self.clock())
        if self.settings.exit_when_idle and not self.batches.source.deliverable():
            self._log_drained()
            self.stop.request("idle")
            return
        # A quiet outbox is polled more slowly too (--idle-tick; 1x with its default of 6ms).
        self._wait(self.settings.poll_interval * self.wakeup.slowdown(self.clock()))

    def _send(
        self,
        rows: list[ClaimedRow],
        held: Undelivered,
        *,
        limit: int,
        started: float,
        woken: bool,
    ) -> None:
        """Publish a claimed batch and record its outcomes, the next claim prefetched meanwhile
        when more rows are waiting."""
        # A batch cut by neither limit took everything deliverable: the next claim would find
        # only what commits meanwhile, so it waits until this batch is done instead of taking a
        # core from it (which, at low rates, is latency).
        more_waiting = filled(rows, limit, self.settings.batch_max_bytes)
        if self.settings.prefetch and limit == self.settings.batch_size and more_waiting:
            self.batches.prefetch(
                limit,
                ownership=self.shards.ownership,
                floor=self.floor.value,
                in_flight=[row.id for row in rows],
            )
        if self._first_claim_at is None:
            self._first_claim_at = started
        # The rebalances and floor samples were spaced out while the outbox was quiet: it is
        # not any more (a frugal relay samples every second only while draining).
        self._draining = more_waiting
        self.chores.bring_forward("rebalance", started + self.settings.rebalance_interval)
        if not math.isinf(self.floor.next_sample) and (more_waiting or not self.wakeup.frugal):
            self.chores.bring_forward("floor", started + FLOOR_EVERY)
        outcomes, sent = self.batches.publish(rows, held, should_abort=self._grace_expired)
        all_delivered = self._finish(rows, outcomes, sent=sent)
        self._last_commit_at = self.clock()
        self.wakeup.active(self._last_commit_at)
        self.metrics.observe_batch(rows, outcomes, self._last_commit_at - started)
        if woken:
            self.chores.run_due(self._last_commit_at)
        # And once it is done, wait for what commits later (at once if something did meanwhile)
        # rather than claim nothing, which at low rates took as long as the batch itself.
        # Failures keep the next claim immediate (rows a broker failure left are due at once),
        # and --exit-when-idle claims to find the end.
        if not (more_waiting or self.settings.exit_when_idle) and all_delivered:
            self._wait(self.settings.poll_interval)

    def _finish(
        self, rows: Sequence[ClaimedRow], outcomes: Sequence[Outcome], *, sent: bool
    ) -> bool:
        """Record the batch's outcomes and commit; whether every row was delivered."""
        delivered, failures = self.batches.record(rows, outcomes)
        self.totals.published += len(delivered)
        for failure in failures:
            if failure.dead:
                self.totals.dead_lettered += 1
                self.metrics.dead_lettered(1)
                log.warning("event.dead_lettered", row_id=failure.row_id, error=failure.error)
        if sent:  # else every row waited behind its key: Kafka was not asked, so nothing learnt
            broker_failures = [o for o in outcomes if o.result is Result.BROKER]
            self.outage.record(ok=bool(delivered) or not broker_failures, failures=broker_failures)
        return len(delivered) == len(rows)

    def _wait(self, timeout: float) -> None:
        """Until events may be waiting (``.wakeup``), a stop, the timeout, a chore that cannot
        wait (a rebalance, a purge pass), or a scheduled event falling due (then released at
        the next step)."""
        hold = self._chores.release_hold
        self._woken = self.wakeup.wait(
            self.shards.connection,
            min(timeout, self._until_chores()),
            floor=self.floor.value,
            stop=self.stop,
            clock=self.clock,
            due_not_before=hold,
        )
        if self.wakeup.due_at is not None:
            self.chores.bring_forward("release", max(self.wakeup.due_at, hold))

    def _pause(self, timeout: float) -> None:
        """Until a stop, the timeout or a chore that cannot wait, whatever commits meanwhile."""
        self._sleep(min(timeout, self._until_chores()))

    def _until_chores(self) -> float:
        """Seconds until the next rebalance or purge pass is due (0 if one is)."""
        return self.chores.until_next(self.clock())

    def _grace_expired(self) -> bool:
        started = self.stop.requested_at
        return started is not None and self.clock() - started > self.settings.grace_period

    def _log_drained(self) -> None:
        """How long the run took from its first claim to its last commit: a one-shot drain's
        own timing, without start-up, shard assignment or shut-down."""
        first, last = self._first_claim_at, self._last_commit_at
        seconds = round(last - first, 4) if first is not None and last is not None else 0.0
        log.info(
            "relay.drained",
            published=self.totals.published,
            seconds=seconds,
            events_per_s=round(self.totals.published / seconds) if seconds > 0 else None,
        )

    def _recover_database(self, exc: psycopg.Error) -> None:
        """Drop both connections (and so our shards), then reconnect until it works.

        A batch interrupted here stays unpublished in the table (its transaction is gone) and is
        sent again after the reconnection: duplicates, never loss.
        """
        log.error("database.unavailable", error=one_line(exc))
        self.close_connections(leave=self._settle_producer())
        self.floor.reset()
        self.chores.make_due("floor")
        self.metrics.database_ok(False)
        self.metrics.outbox_up(False)
        self.metrics.set_shards_owned(0)
        if reconnect(
            self.connect,
            self.close_connections,
            stop=self.stop,
            sleep=self._sleep,
            alive=self.metrics.beat,
        ):
            self.metrics.outbox_up(True)

    def shutdown(self) -> None:
        """Stop the claim thread (after ``close_connections``)."""
        self.batches.shutdown()

    def _sleep(self, seconds: float) -> None:
        select.select([self.stop.fd], [], [], seconds)

    def close_connections(self, *, leave: bool = False) -> None:
        """Close every session. ``leave``: the producer is settled, so the relay leaves the
        registry and nobody waits for it before claiming its shards (``.handover``)."""
        self.batches.close()
        with contextlib.suppress(psycopg.Error):  # already gone
            self.shards.close(leave=leave)

    def leave(self) -> None:
        """Close every session once nothing this relay sent can reach Kafka later, leaving the
        registry, so that no relay waits for this one before claiming its shards."""
        self.close_connections(leave=self._settle_producer())

    def _settle_producer(self) -> bool:
        """Before the relay lets go of its shards: nothing it sent may reach Kafka later."""
        settled = self.publisher.settle(self.settings.delivery_timeout)
        if not settled:
            log.warning("kafka.unsettled", timeout=self.settings.delivery_timeout)
        return settled


@contextlib.contextmanager
def served_metrics(
    settings: RelaySettings,
    probe_broker: Callable[[float], None] | None,
    *,
    isolated: bool,
) -> Iterator[RelayMetrics | None]:
    """With ``settings.metrics_port``, the process's metrics and health probes, served over
    HTTP while the block runs (else None). ``/readyz`` calls ``probe_broker(timeout)`` (raising
    when the broker does not answer in time) from the HTTP thread; ``isolated`` (several
    outboxes): one outbox's failing database does not make the relay unready."""
    if settings.metrics_port is None:
        yield None
        return
    from outbox_relay import metrics as relay_metrics  # prometheus-client only when asked for

    health = relay_metrics.Health(
        stale_after=relay_metrics.heartbeat_timeout(settings), probe_broker=probe_broker
    )
    metrics = relay_metrics.RelayMetrics(health=health)
    metrics.isolated = isolated
    server = relay_metrics.MetricsServer(metrics, settings.metrics_host, settings.metrics_port)
    server.start()
    try:
        yield metrics
    finally:
        server.close()


def serve(
    settings: RelaySettings,
    publisher: Publisher,
    *,
    name: str,
    check_broker: Callable[[], None],
    probe_broker: Callable[[float], None] | None = None,
) -> None:
    """Start a relay serving one outbox (``name`` in metrics), run it until stopped, and shut
    it down cleanly.

    Raises (before running) when PostgreSQL is unreachable, the schema is not current, or the
    broker does not answer: the CLI turns each into one message and its exit code. With
    ``settings.metrics_port``, serves metrics and health probes meanwhile.
    """
    stop = StopSignal()
    stop.install()
    try:
        with served_metrics(settings, probe_broker, isolated=False) as metrics:
            outbox_metrics = None
            if metrics is not None:
                metrics.set_listed([name])
                outbox_metrics = metrics.for_outbox(name)
            relay = Relay(settings, publisher, stop, metrics=outbox_metrics)
            try:
                relay.start()
                check_broker()
                relay.metrics.outbox_up(True)
                relay.run()
            finally:
                relay.leave()
                relay.shutdown()
    finally:
        stop.restore()
        stop.close()
    log.info("relay.stopped", reason=stop.reason, published=relay.totals.published)


def require_privileges(source: OutboxSource, settings: RelaySettings) -> None:
    """ConfigurationError naming what the relay's role lacks to record what it publishes."""
    missing = source.missing_privileges()
    if missing:
        user = source.connection.info.user
        raise ConfigurationError(
            f"the relay's role {user!r} lacks {', '.join(missing)}, which the relay needs to"
            " record what it publishes"
            + (" (--retention moves published rows to that table)" if settings.retention else "")
            + f"; grant it, e.g. GRANT {missing[0].replace(' on ', ' ON ')} TO {user}"
        )
