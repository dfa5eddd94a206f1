"""What ``/healthz`` and ``/readyz`` answer: set by the loops of the outboxes a relay serves,
read by the metrics server's HTTP thread.

Liveness is one question for the whole process: has any loop (an outbox's, or the fleet's
supervisor) beaten lately? Readiness asks the broker, and each outbox whether its database
answers and its schema was found current. With one outbox, its failures make the relay
unready, as they always did. With several (``isolated``), one tenant's dead database must not
make every relay of the fleet unready and hold up a rolling deploy: only the broker decides,
and the outboxes' failures are listed below the verdict.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable

from outbox.errors import one_line

#: How long a broker answer to ``/readyz`` is reused, and how long one question may take.
BROKER_CHECK_CACHE_S = 1.5
BROKER_CHECK_TIMEOUT_S = 1.0


class OutboxHealth:
    """The health of one served outbox: its loop's heartbeat, database and schema."""

    def __init__(self, clock: Callable[[], float]) -> None:
        self._clock = clock
        self.last_beat = clock()
        #: Whether the loop's last database operation succeeded (False until connected).
        self.database_ok = False
        #: Whether the schema was found current at start.
        self.schema_current = False

    def beat(self) -> None:
        self.last_beat = self._clock()

    def problems(self) -> list[tuple[str, str]]:
        """(subject, what is wrong) pairs; empty when the outbox is served."""
        found = []
        if not self.schema_current:
            found.append(("schema", "not checked yet"))
        if not self.database_ok:
            found.append(("database", "unreachable (reconnecting)"))
        return found


class Health:
    """The relay's liveness and readiness, over the outboxes it serves."""

    def __init__(
        self,
        *,
        stale_after: float,
        probe_broker: Callable[[float], None] | None = None,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        self.stale_after = stale_after
        #: Several outboxes: their failures are reported but leave the relay ready.
        self.isolated = False
        self._probe_broker = probe_broker
        self._clock = clock
        self._last_beat = clock()
        self._outboxes: dict[str, OutboxHealth] = {}
        self._outboxes_lock = threading.Lock()
        self._broker_lock = threading.Lock()
        self._broker_checked_at: float | None = None
        self._broker_error: str | None = None

    def outbox(self, name: str) -> OutboxHealth:
        """The health of the outbox called ``name``, tracked from now on."""
        with self._outboxes_lock:
            return self._outboxes.setdefault(name, OutboxHealth(self._clock))

    def forget(self, name: str) -> None:
        """The relay no longer serves ``name``: its state no longer counts."""
        with self._outboxes_lock:
            self._outboxes.pop(name, None)

    def beat(self) -> None:
        """The relay's own loop (the fleet's supervisor) is alive."""
        self._last_beat = self._clock()

    def live(self) -> tuple[bool, str]:
        newest = max([self._last_beat, *(o.last_beat for _, o in self._served())])
        silent = self._clock() - newest
        if silent > self.stale_after:
            return False, f"relay loop silent for {silent:.0f} s (limit {self.stale_after:g} s)"
        return True, "ok"

    def ready(self) -> tuple[bool, str]:
        outboxes = self._outbox_problems()
        broker_error = self._broker()
        broker = [] if broker_error is None else [f"kafka: {broker_error}"]
        if self.isolated:  # the outboxes' problems are told, below the verdict
            return (not broker, "\n".join([*(broker or ["ok"]), *outboxes]))
        failing = outboxes + broker
        return (not failing, "\n".join(failing) or "ok")

    def _served(self) -> list[tuple[str, OutboxHealth]]:
        with self._outboxes_lock:
            return sorted(self._outboxes.items())

    def _outbox_problems(self) -> list[str]:
        """One line per problem; named after its outbox unless the relay serves only one."""
        served = self._served()
        if not served and not self.isolated:
            return ["outbox: none served yet"]
        if len(served) == 1 and not self.isolated:
            return [f"{subject}: {what}" for subject, what in served[0][1].problems()]
        return [
            f"outbox {name}: {subject} {what}"
            for name, outbox in served
            for subject, what in outbox.problems()
        ]

    def _broker(self) -> str | None:
        """None when the broker answered lately, else why not (asked at most every 1.5 s)."""
        if self._probe_broker is None:
            return None
        with self._broker_lock:
            now = self._clock()
            fresh = self._broker_checked_at is not None and (
                now - self._broker_checked_at < BROKER_CHECK_CACHE_S
            )
            if not fresh:
                try:
                    self._probe_broker(BROKER_CHECK_TIMEOUT_S)
                    self._broker_error = None
                except Exception as exc:  # any failure means "not ready", with its reason
                    self._broker_error = one_line(exc)
                self._broker_checked_at = self._clock()
            return self._broker_error
