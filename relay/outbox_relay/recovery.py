"""Getting the database back: reconnect with jittered backoff until it works or a stop comes."""

from __future__ import annotations

from collections.abc import Callable

import psycopg
import structlog

from outbox.backoff import full_jitter
from outbox_relay.pg import DatabaseUnavailableError
from outbox_relay.signals import StopSignal

log = structlog.get_logger("relay.recovery")

#: Seconds of the backoff between attempts: random(0, min(cap, base * 2**attempt)).
BASE, CAP = 0.5, 30.0


def reconnect(
    connect: Callable[[], None],
    close: Callable[[], None],
    *,
    stop: StopSignal,
    sleep: Callable[[float], None],
    alive: Callable[[], None],
) -> bool:
    """Call ``connect`` after a backoff until it succeeds (True) or a stop is requested (False);
    ``close`` cleans up after a failed attempt, ``alive`` is called around each wait (waiting
    to reconnect is being alive)."""
    attempt = 0
    while not stop.requested:
        alive()
        sleep(full_jitter(attempt, base=BASE, cap=CAP))
        alive()
        if stop.requested:
            return False
        try:
            connect()
        except (psycopg.Error, DatabaseUnavailableError) as exc:
            close()
            attempt += 1
            log.debug("database.reconnect_failed", attempt=attempt, error=str(exc))
            continue
        log.info("database.reconnected", attempts=attempt + 1)
        return True
    return False
