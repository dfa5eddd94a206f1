"""One outbox of a fleet, served in a thread of its own: its relay, its producer, its failures.

An outbox fails alone. Its start-up checks (database reachable, schema current, privileges) are
retried with a growing backoff, logging one line when it starts failing, another when its error
changes and one when it serves again; its relay recovers from database outages as a lone relay
does (``Relay._recover_database``), and has its own circuit breaker. Every log line of the thread
names the outbox.
"""

from __future__ import annotations

import select
import threading
from collections.abc import Callable

import psycopg
import structlog

from outbox.errors import ConfigurationError, SchemaError, one_line
from outbox_relay.backoff import full_jitter
from outbox_relay.config import RelaySettings
from outbox_relay.loop import Relay
from outbox_relay.outboxes import OutboxEntry
from outbox_relay.pg import DatabaseUnavailableError
from outbox_relay.ports import Metrics, Publisher
from outbox_relay.signals import StopSignal

log = structlog.get_logger("relay.outbox")

#: Backoff of an outbox whose start-up checks fail: random(0, min(CAP, BASE * 2**attempt)) s.
RETRY_BASE, RETRY_CAP = 1.0, 120.0
#: What an outbox's start can fail with and be retried: anything of its own database.
STARTUP_ERRORS = (psycopg.Error, DatabaseUnavailableError, SchemaError, ConfigurationError)


class OutboxWorker:
    """Serves ``entry`` until asked to stop (``request_stop``), then leaves it cleanly."""

    def __init__(
        self,
        entry: OutboxEntry,
        settings: RelaySettings,
        metrics: Metrics,
        new_publisher: Callable[[RelaySettings], Publisher],
    ) -> None:
        self.entry = entry
        self.settings = entry.settings(settings)
        self.metrics = metrics
        self._new_publisher = new_publisher
        self.stop = StopSignal()
        #: The error its start last failed with ("" while it serves).
        self.failure = ""
        self.published = 0
        self._thread = threading.Thread(target=self._run, name=f"outbox-{entry.name}", daemon=True)

    def start(self) -> None:
        self._thread.start()

    def request_stop(self, reason: str) -> None:
        self.stop.request(reason)

    @property
    def done(self) -> bool:
        return not self._thread.is_alive()

    def join(self, timeout: float) -> None:
        self._thread.join(timeout)

    def _run(self) -> None:
        structlog.contextvars.bind_contextvars(
            relay_id=self.settings.relay_id, outbox=self.entry.name
        )
        try:
            self._serve()
        except Exception:  # a bug must not take the other outboxes' relays down with it
            log.exception("outbox.crashed", hint="the relay serves it again at its next pass")

    def close(self) -> None:
        """Once its thread has ended: release its stop signal's pipe (by the thread that asks
        it to stop, so that no request writes to a pipe closed meanwhile)."""
        self.stop.close()

    def _serve(self) -> None:
        publisher = self._new_publisher(self.settings)
        attempt = 0
        while not self.stop.requested:
            relay = Relay(self.settings, publisher, self.stop, metrics=self.metrics)
            try:
                relay.start()
            except STARTUP_ERRORS as exc:
                relay.close_connections()
                relay.shutdown()
                self._failed(one_line(exc), attempt)
                attempt += 1
                continue
            if self.failure:
                log.info("outbox.recovered", after_attempts=attempt)
            self.failure, attempt = "", 0
            log.info("outbox.serving", where=self.entry.where)
            self.metrics.outbox_up(True)
            try:
                relay.run()
            finally:
                relay.leave()
                relay.shutdown()
                self.published += relay.totals.published
        log.info("outbox.left", reason=self.stop.reason, published=self.published)

    def _failed(self, error: str, attempt: int) -> None:
        """Log the failure once per change of error, and wait before the next attempt."""
        delay = full_jitter(attempt, base=RETRY_BASE, cap=RETRY_CAP)
        if error != self.failure:
            log.error("outbox.failing", error=error, where=self.entry.where)
            self.failure = error
        self.metrics.outbox_up(False)
        self.metrics.beat()
        select.select([self.stop.fd], [], [], delay)
