"""The write path is the INSERT and nothing else, and an idle relay still wakes for new events.

Migration 0005 removed the two triggers writers used to run (a NOTIFY, which serialized every
writer's commit behind one database-wide lock, and a statement trigger that took a transaction
id). These tests pin that no trigger or rule comes back, that installations at 0004 are carried
over with their rows, and what ``outbox_relay.wakeup.wait_for_events`` wakes for: rows committed
above the bound of the last look, and late rows below it (among the 64 highest waiting); not
an uncommitted row, nor another table's commit, nor rows already waiting at the look. Timing
belongs to the benchmark (``bench/idle.py``).
"""

from __future__ import annotations

import datetime as dt
import threading
import time
from collections.abc import Iterator
from typing import Any

import psycopg
import pytest
from structlog.testing import capture_logs

import outbox
from outbox import migrator, schema, testing
from outbox.settings import OutboxSettings
from outbox_relay.config import RelaySettings
from outbox_relay.loop import Relay
from outbox_relay.signals import StopSignal
from outbox_relay.wakeup import Wakeup
from tests.integration.test_relay_loop import ScriptedPublisher

DEFAULT = OutboxSettings()


@pytest.fixture
def stop() -> Iterator[StopSignal]:
    signal = StopSignal()
    yield signal
    signal.close()


@pytest.fixture
def waiter(database_url: str) -> Iterator[psycopg.Connection[Any]]:
    """The relay's ownership connection, as the relay opens it (autocommit)."""
    with psycopg.connect(database_url, autocommit=True) as conn:
        yield conn


def add(database_url: str, key: str = "k") -> None:
    with psycopg.connect(database_url) as conn:
        outbox.add(conn, "orders", {"key": key}, key=key)


def test_the_outbox_table_has_no_trigger_and_no_rule(database_url: str) -> None:
    """Nothing runs in the writer's transaction but the INSERT: no trigger (so none that calls
    pg_notify, whose commit-time lock is database-wide), no rule, and no function of the outbox
    that notifies."""
    with psycopg.connect(database_url) as conn:
        triggers = conn.execute(
            "SELECT tgname FROM pg_trigger"
            " WHERE tgrelid = 'outbox_events'::regclass AND NOT tgisinternal"
        ).fetchall()
        rules = conn.execute(
            "SELECT rulename FROM pg_rewrite WHERE ev_class = 'outbox_events'::regclass"
        ).fetchall()
        notifying = conn.execute(
            "SELECT proname FROM pg_proc WHERE pronamespace = 'public'::regnamespace"
            " AND proname LIKE 'outbox\\_%%' AND prosrc ~* '(pg_notify|\\mnotify\\M)'"
        ).fetchall()
    assert triggers == []
    assert rules == []
    assert notifying == []


def test_an_installation_at_0004_is_carried_over_with_its_rows(
    empty_database_url: str, stop: StopSignal
) -> None:
    """Rows written under 0004 (with its triggers) survive 0005, which drops the triggers; the
    relays of 0004's version, whose scan floor needed them, get no floor; a relay of this
    version then publishes the old rows and later ones, each key in order."""
    url = empty_database_url
    testing.apply_migrations_up_to(url, 4)
    with psycopg.connect(url) as conn:
        assert conn.execute(
            "SELECT count(*) FROM pg_trigger WHERE tgrelid = 'outbox_events'::regclass"
            " AND NOT tgisinternal"
        ).fetchone() == (2,)
        outbox.add_many(
            conn, [outbox.Event("orders", f"old{i}".encode(), key="k") for i in range(3)]
        )
    with psycopg.connect(url) as conn:
        assert [m.version for m in migrator.apply(conn, DEFAULT)] == list(
            range(5, schema.latest_version() + 1)
        )
        migrator.require_current(conn, DEFAULT)
        # A relay of 0004's version still running reads its floor's bound here: 0, no floor.
        assert conn.execute("SELECT outbox_id_bound()").fetchone() == (0,)
        outbox.add_many(
            conn, [outbox.Event("orders", f"new{i}".encode(), key="k") for i in range(2)]
        )
    publisher = ScriptedPublisher(fail=set())
    settings = RelaySettings(
        database_url=url, kafka_bootstrap_servers="unused:9092", exit_when_idle=True
    )
    relay = Relay(settings, publisher, stop)
    relay.connect()
    try:
        for _ in range(10):
            if stop.requested:
                break
            relay.step()
    finally:
        relay.leave()
        relay.shutdown()
    assert publisher.sent == [b"old0", b"old1", b"old2", b"new0", b"new1"]


# --- the wake-up (outbox_relay.wakeup) -----------------------------------------------------


def woken_by_its_commit(
    wakeup: Wakeup,
    waiter: psycopg.Connection[Any],
    stop: StopSignal,
    writer: psycopg.Connection[Any],
) -> bool:
    """Whether a wait (of up to 20 s) returns woken once ``writer`` commits, 0.2 s into it."""
    timer = threading.Timer(0.2, writer.commit)
    timer.start()
    try:
        return wakeup.wait(waiter, 20, floor=0, stop=stop)
    finally:
        timer.join()


def test_the_first_wait_only_looks(waiter: psycopg.Connection[Any], stop: StopSignal) -> None:
    """With nothing seen yet, the relay must claim: the wait returns at once."""
    assert Wakeup(DEFAULT).wait(waiter, 30, floor=0, stop=stop) is True


def test_a_committed_event_wakes_the_wait_and_an_uncommitted_one_does_not(
    database_url: str, waiter: psycopg.Connection[Any], stop: StopSignal
) -> None:
    wakeup = Wakeup(DEFAULT)
    wakeup.wait(waiter, 0, floor=0, stop=stop)  # the look
    assert wakeup.wait(waiter, 0.3, floor=0, stop=stop) is False  # nothing new
    with psycopg.connect(database_url) as writer:
        outbox.add(writer, "orders", {}, key="k")  # holds a new id, not committed
        assert wakeup.wait(waiter, 0.3, floor=0, stop=stop) is False
        assert woken_by_its_commit(wakeup, waiter, stop, writer)


def test_a_late_row_of_a_transaction_running_at_the_look_wakes_the_wait(
    database_url: str, waiter: psycopg.Connection[Any], stop: StopSignal
) -> None:
    """Its id is below the bound of the look (it was taken before), so the sequence tells
    nothing: the wait sees a waiting row that was not there at the look."""
    wakeup = Wakeup(DEFAULT)
    with psycopg.connect(database_url) as late:
        outbox.add(late, "orders", {}, key="k")  # id taken and a transaction id: running
        wakeup.wait(waiter, 0, floor=0, stop=stop)  # the look: bound past that id
        assert wakeup.wait(waiter, 0.3, floor=0, stop=stop) is False
        assert woken_by_its_commit(wakeup, waiter, stop, late)


def test_a_commit_that_wrote_no_event_does_not_wake_the_wait(
    database_url: str, waiter: psycopg.Connection[Any], stop: StopSignal
) -> None:
    """Busy applications commit all the time; only commits with outbox rows count."""
    wakeup = Wakeup(DEFAULT)
    with psycopg.connect(database_url) as other:
        other.execute("CREATE TABLE unrelated (n int)")
        other.execute("INSERT INTO unrelated VALUES (1)")  # a transaction id: running
        wakeup.wait(waiter, 0, floor=0, stop=stop)
        other.commit()
    assert wakeup.wait(waiter, 0.5, floor=0, stop=stop) is False


def test_a_stop_request_ends_the_wait(waiter: psycopg.Connection[Any], stop: StopSignal) -> None:
    wakeup = Wakeup(DEFAULT)
    wakeup.wait(waiter, 0, floor=0, stop=stop)
    threading.Timer(0.2, stop.request, args=("test",)).start()
    assert wakeup.wait(waiter, 60, floor=0, stop=stop) is False
    assert stop.requested


def test_a_sequence_with_a_cache_falls_back_to_polling_and_says_so(
    database_url: str, waiter: psycopg.Connection[Any], stop: StopSignal
) -> None:
    """Ids from per-session caches do not grow with time, so the sequence tells nothing: the
    wait sleeps its whole timeout (the poll interval) and the relay logs why, once."""
    with psycopg.connect(database_url) as conn:
        conn.execute("ALTER TABLE outbox_events ALTER COLUMN id SET CACHE 20")
    wakeup = Wakeup(DEFAULT)
    with capture_logs() as logs:
        wakeup.wait(waiter, 0, floor=0, stop=stop)
        add(database_url)
        assert wakeup.wait(waiter, 0.3, floor=0, stop=stop) is False
    assert [entry["event"] for entry in logs] == ["relay.wakeup_by_polling"]


def test_rows_waiting_for_a_retry_do_not_keep_waking_the_wait(
    database_url: str, waiter: psycopg.Connection[Any], stop: StopSignal
) -> None:
    """Unpublished rows no claim can take yet (here 100, waiting for a retry) are in the look;
    they do not wake the wait again (no busy loop), while a late row among them still does."""
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [outbox.Event("orders", {"n": i}, key="k") for i in range(100)])
        conn.execute("UPDATE outbox_events SET next_attempt_at = now() + interval '1 hour'")
    wakeup = Wakeup(DEFAULT)
    with psycopg.connect(database_url) as late:
        outbox.add(late, "orders", {}, key="late")  # the highest id, not committed yet
        wakeup.wait(waiter, 0, floor=0, stop=stop)  # the look: past that id
        assert wakeup.wait(waiter, 0.5, floor=0, stop=stop) is False
        assert wakeup.wait(waiter, 0.5, floor=0, stop=stop) is False
        late.commit()
    assert wakeup.wait(waiter, 20, floor=0, stop=stop) is True


def test_an_event_scheduled_during_a_wait_ends_it_when_it_falls_due(
    database_url: str, waiter: psycopg.Connection[Any], stop: StopSignal
) -> None:
    """An idle relay learns of a scheduled event at the end of a call of its wait (no statement
    of its own), and the wait then ends when the event falls due, not at its timeout, nor at
    once: so the relay releases it on time, and does nothing in between."""
    wakeup = Wakeup(DEFAULT)
    wakeup.wait(waiter, 0, floor=0, stop=stop)  # the look
    assert wakeup.due_at is None  # nothing scheduled
    with psycopg.connect(database_url) as writer:
        outbox.add(writer, "orders", {}, key="k", delay=dt.timedelta(seconds=1.5))
    started = time.monotonic()
    assert wakeup.wait(waiter, 20, floor=0, stop=stop) is False  # not woken by events
    waited = time.monotonic() - started
    assert wakeup.due_at is not None
    assert 1.3 < waited < 5.0, waited  # generous: ended by the due time, not the 20 s
    assert wakeup.due_at <= time.monotonic() + 0.05


def test_due_rows_left_for_later_do_not_end_a_wait_before_the_hold(
    database_url: str, waiter: psycopg.Connection[Any], stop: StopSignal
) -> None:
    """A due row the relay could not release (locked by a cancel not yet committed, say) would
    end every wait at once: with the relay's hold, the wait lasts until then instead."""
    with psycopg.connect(database_url) as writer:
        outbox.add(writer, "orders", {}, key="k", delay=dt.timedelta(0))
    wakeup = Wakeup(DEFAULT)
    wakeup.wait(waiter, 0, floor=0, stop=stop)  # the look
    started = time.monotonic()
    assert wakeup.wait(waiter, 20, floor=0, stop=stop) is False
    assert time.monotonic() - started < 1.0  # due already: the wait ends at once
    started = time.monotonic()
    wakeup.wait(waiter, 20, floor=0, stop=stop, due_not_before=started + 0.8)
    assert 0.7 < time.monotonic() - started < 5.0
