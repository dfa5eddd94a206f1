"""A late row deep in the table still wakes an idle relay.

Row ids are handed out before commit, so a transaction that took its id before others committed
can commit after them: its row appears below ids the relay has seen. The wait looks at the 64
highest waiting rows for such a row; behind more rows than that which no claim takes (a key
stuck behind a row waiting for its retry, here), it used to wait for the poll interval. These
tests set the poll interval (and the rebalance interval, which also ends a wait) to 30 s, so a
row published within a few seconds was woken for.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Iterator

import psycopg
import pytest

import outbox
from outbox.settings import OutboxSettings
from outbox_relay.signals import StopSignal
from outbox_relay.wakeup import Wakeup
from tests.integration.test_relay_loop import ScriptedPublisher, relay_for, write

#: Far below the 30 s poll interval, far above a wake-up (milliseconds) on a loaded machine.
PROMPTLY = 5.0
STUCK = 150  # rows behind the poison row of their key: more than the 64 the wait looks at


@pytest.fixture
def stop() -> Iterator[StopSignal]:
    signal = StopSignal()
    yield signal
    signal.close()


def sent_within(publisher: ScriptedPublisher, payload: bytes, seconds: float) -> float | None:
    """Seconds until ``payload`` was handed to the publisher, or None after ``seconds``."""
    started = time.monotonic()
    while time.monotonic() - started < seconds:
        if payload in publisher.sent:
            return time.monotonic() - started
        time.sleep(0.01)
    return None


def test_a_late_row_behind_many_stuck_rows_is_published_long_before_the_poll(
    database_url: str, stop: StopSignal
) -> None:
    """The late row's transaction takes its id first; then 150 rows of a key commit, the first
    of them waiting an hour for its retry and the others behind it; the relay goes idle; the
    late transaction commits. Its row is published within seconds, not at the next poll
    (30 s)."""
    with psycopg.connect(database_url) as late:
        outbox.add(late, "orders", b"late", key="late")  # the lowest id, not committed yet
        write(database_url, [("stuck", f"s{i}") for i in range(STUCK)])
        with psycopg.connect(database_url) as conn:  # s0 failed once: its retry is an hour away
            conn.execute(
                "UPDATE outbox_events SET attempts = 1, last_error = 'poison',"
                " next_attempt_at = now() + interval '1 hour' WHERE payload = 's0'"
            )
        publisher = ScriptedPublisher(fail=set())
        relay = relay_for(
            database_url,
            publisher,
            stop,
            batch_size=100,
            exit_when_idle=False,
            poll_interval=30,
            rebalance_interval=30,
        )
        thread = threading.Thread(target=relay.run)
        thread.start()
        try:
            time.sleep(1.0)  # the relay claims nothing and goes idle in its wait
            assert publisher.sent == []
            late.commit()
            latency = sent_within(publisher, b"late", 40)
        finally:
            stop.request("test over")
            thread.join(timeout=30)
            relay.leave()
            relay.shutdown()
    print(f"late row published {latency} s after its commit")
    assert latency is not None
    assert latency < PROMPTLY


def test_the_wait_wakes_for_a_late_row_below_many_waiting_rows(
    database_url: str, stop: StopSignal
) -> None:
    """The wait itself: 150 rows waiting for a retry above the late row, all in the look; the
    late row's commit ends a 30 s wait within seconds, and the look that follows sees it."""
    with psycopg.connect(database_url, autocommit=True) as waiter:
        with psycopg.connect(database_url) as late:
            outbox.add(late, "orders", b"late", key="late")
            with psycopg.connect(database_url) as conn:
                outbox.add_many(
                    conn,
                    [outbox.Event("orders", {"n": i}, key="stuck") for i in range(STUCK)],
                )
                conn.execute("UPDATE outbox_events SET next_attempt_at = now() + interval '1 hour'")
            wakeup = Wakeup(OutboxSettings())
            wakeup.wait(waiter, 0, floor=0, stop=stop)  # the look
            assert wakeup.wait(waiter, 0.5, floor=0, stop=stop) is False  # nothing new
            timer = threading.Timer(0.2, late.commit)
            timer.start()
            started = time.monotonic()
            try:
                woken = wakeup.wait(waiter, 30, floor=0, stop=stop)
            finally:
                timer.join()
            waited = time.monotonic() - started
        print(f"wait returned woken={woken} after {waited:.3f} s")
        assert woken is True
        assert waited < PROMPTLY
        # Nothing new since: the next wait sleeps (no busy loop over the waiting rows).
        assert wakeup.wait(waiter, 0.5, floor=0, stop=stop) is False
