"""Relays that crash, stop, compete and hand shards over: nothing lost, per-key order kept.

Every relay is a real process against the real PostgreSQL and Kafka-protocol broker. The
guarantees under test: every written event reaches Kafka; a key's events reach it in the order
they were written; a relay killed mid-batch duplicates at most that batch; relays that did not
crash duplicate nothing.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

from outbox.testing import log_events
from tests.acceptance.relay_harness import (
    Received,
    broker_behind_proxy,
    create_topic,
    per_key_order_violations,
    read_topic,
    run_relay,
    start_relay,
    stop,
    unpublished,
    wait_until,
    write_events,
)

SHARDS = 256


def wait_for_progress(
    database_url: str,
    total: int,
    procs: Sequence[subprocess.Popen[bytes]],
    *,
    below: int | None = None,
    timeout: float = 30,
) -> int:
    """Poll until some but not all rows are published (fewer than ``below`` left, default
    ``total``); returns the count left. Fails if the backlog drains or a relay exits first."""
    below = total if below is None else below
    deadline = time.monotonic() + timeout
    while True:
        left = unpublished(database_url)
        if 0 < left < below:
            return left
        assert left > 0, "the backlog drained before the relay could be interrupted mid-stream"
        for proc in procs:
            assert proc.poll() is None, f"a relay exited early with {proc.returncode}"
        assert time.monotonic() < deadline, f"no progress within {timeout} s ({left} left)"
        time.sleep(0.01)


def log_lines(path: Path, event: str | None = None) -> list[dict[str, Any]]:
    """The JSON log lines of a relay (optionally only those of one event)."""
    return log_events(path.read_text(), event) if path.exists() else []


def owned_shards(path: Path) -> int:
    """Shards the relay logging to ``path`` owns, as of its latest rebalance."""
    rebalanced = log_lines(path, "shards.rebalanced")
    return int(rebalanced[-1]["owned"]) if rebalanced else 0


def published_by(path: Path) -> int:
    """Rows the relay logging to ``path`` published, as it said when it stopped."""
    stopped = log_lines(path, "relay.stopped")
    assert len(stopped) == 1, path.read_text()
    return int(stopped[0]["published"])


def wait_for_log(path: Path, predicate: Callable[[Path], bool], timeout: float = 20) -> None:
    wait_until(lambda: predicate(path), timeout=timeout, interval=0.05)


def lockable_rows(database_url: str) -> tuple[int, int]:
    """(rows in the outbox, rows nobody holds a lock on)."""
    with psycopg.connect(database_url) as conn:
        total = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
        free = conn.execute(
            "SELECT count(*) FROM (SELECT id FROM outbox_events FOR UPDATE SKIP LOCKED) AS f"
        ).fetchone()
    assert total is not None
    assert free is not None
    return int(total[0]), int(free[0])


def relay_sessions(database_url: str) -> int:
    """Sessions of any relay still connected to the test's database."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity"
            " WHERE datname = current_database() AND application_name LIKE 'outbox-relay %%'"
        ).fetchone()
    assert row is not None
    return int(row[0])


def check_delivery(received: Sequence[Received], ids: Sequence[str]) -> int:
    """Every id arrived, each key in written order; returns the number of duplicates."""
    seen = {r.event_id for r in received}
    missing = set(ids) - seen
    assert not missing, f"{len(missing)} events never reached Kafka, e.g. {sorted(missing)[:5]}"
    assert seen <= set(ids), "messages that were never written"
    assert per_key_order_violations(received, ids) == []
    return len(received) - len(seen)


def test_killed_relay_loses_nothing_and_duplicates_at_most_one_batch(
    database_url: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """SIGKILL mid-stream, then a new relay: all delivered, in order, <= one batch twice."""
    batch = 500
    topic = create_topic(kafka_bootstrap)
    ids = write_events(database_url, topic, 20_000, keys=50)

    relay = start_relay(
        database_url, kafka_bootstrap, "--batch-size", str(batch), log=tmp_path / "killed.log"
    )
    try:
        wait_for_progress(database_url, len(ids), [relay])
    finally:
        relay.kill()
    assert relay.wait(timeout=10) == -signal.SIGKILL
    left_at_kill = unpublished(database_url)
    assert 0 < left_at_kill < len(ids)

    result = run_relay(
        database_url, kafka_bootstrap, "--batch-size", str(batch), "--exit-when-idle", timeout=60
    )
    assert result.returncode == 0, result.stderr
    assert unpublished(database_url) == 0

    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    duplicates = check_delivery(received, ids)
    print(f"\nkilled relay: {left_at_kill} rows left at the kill, {duplicates} duplicates")
    record_property("rows_left_at_kill", left_at_kill)
    record_property("duplicates", duplicates)
    assert duplicates <= batch


def test_three_relays_share_a_backlog_without_duplicates(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Three relays drain one backlog together: all exit 0, all delivered in order, no dupes."""
    topic = create_topic(kafka_bootstrap)
    ids = write_events(database_url, topic, 15_000, keys=50)
    logs = [tmp_path / f"relay-{i}.log" for i in range(3)]
    relays = [
        start_relay(
            database_url, kafka_bootstrap, "--batch-size", "200", "--exit-when-idle", log=log
        )
        for log in logs
    ]
    try:
        codes = [relay.wait(timeout=60) for relay in relays]
    finally:
        for relay in relays:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
    assert codes == [0, 0, 0], [log.read_text()[-2000:] for log in logs]
    assert unpublished(database_url) == 0
    assert sum(published_by(log) for log in logs) == len(ids)

    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    assert check_delivery(received, ids) == 0


def test_survivors_take_over_a_killed_relays_shards(
    database_url: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
) -> None:
    """One of three busy relays is SIGKILLed: the other two take its shards and drain it all."""
    batch = 200
    topic = create_topic(kafka_bootstrap)
    logs = [tmp_path / f"relay-{i}.log" for i in range(3)]
    relays = [
        start_relay(database_url, kafka_bootstrap, "--batch-size", str(batch), log=log)
        for log in logs
    ]
    try:
        # All three share the shards before the backlog appears, so each has work when it lands.
        wait_until(
            lambda: (
                all(owned_shards(log) > 0 for log in logs)
                and sum(owned_shards(log) for log in logs) == SHARDS
            ),
            timeout=20,
        )
        ids = write_events(database_url, topic, 60_000, keys=50)
        wait_for_progress(database_url, len(ids), relays, below=len(ids) - 2 * batch)
        victim, survivors = relays[0], relays[1:]
        victim.kill()
        assert victim.wait(timeout=10) == -signal.SIGKILL
        left_at_kill = unpublished(database_url)
        assert left_at_kill > 0, "the backlog drained before the kill"

        wait_until(lambda: unpublished(database_url) == 0, timeout=60, interval=0.2)
        wait_until(lambda: sum(owned_shards(log) for log in logs[1:]) == SHARDS, timeout=5)
        codes = [stop(relay, signal.SIGTERM, timeout=20) for relay in survivors]
    finally:
        for relay in relays:
            if relay.poll() is None:
                relay.kill()
                relay.wait()
    assert codes == [0, 0], [log.read_text()[-2000:] for log in logs[1:]]

    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    duplicates = check_delivery(received, ids)
    print(f"\nkilled one of three: {left_at_kill} rows left at the kill, {duplicates} duplicates")
    record_property("rows_left_at_kill", left_at_kill)
    record_property("duplicates", duplicates)
    assert duplicates <= batch


def test_sigterm_during_a_busy_run_exits_0_and_unlocks_everything(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """SIGTERM mid-backlog: exit 0 within the grace period, no row left locked, nothing lost."""
    topic = create_topic(kafka_bootstrap)
    ids = write_events(database_url, topic, 30_000, keys=50)
    log = tmp_path / "relay.log"
    relay = start_relay(
        database_url, kafka_bootstrap, "--batch-size", "500", "--grace-period", "10", log=log
    )
    try:
        wait_for_progress(database_url, len(ids), [relay], below=len(ids) - 1000)
        relay.send_signal(signal.SIGTERM)
        signalled = time.monotonic()
        code = relay.wait(timeout=15)
        took = time.monotonic() - signalled
    finally:
        if relay.poll() is None:
            relay.kill()
            relay.wait()
    assert code == 0, log.read_text()[-2000:]
    assert took < 15
    left = unpublished(database_url)
    assert left > 0, "the relay was not stopped mid-backlog"
    stopping = log_lines(log, "relay.stopping")
    assert [line["reason"] for line in stopping] == ["SIGTERM"]

    total, free = lockable_rows(database_url)
    assert free == total == left
    wait_until(lambda: relay_sessions(database_url) == 0, timeout=10)

    result = run_relay(database_url, kafka_bootstrap, "--exit-when-idle", timeout=60)
    assert result.returncode == 0, result.stderr
    assert unpublished(database_url) == 0
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    assert check_delivery(received, ids) == 0, "a clean stop must not duplicate anything"


@pytest.mark.parametrize("second", [signal.SIGINT, signal.SIGTERM], ids=lambda s: s.name)
def test_second_signal_exits_at_once_and_loses_nothing(
    tmp_path: Path, database_url: str, second: signal.Signals
) -> None:
    """With a batch stuck (broker cut), a second signal exits at once with 128+signal; the
    grace period bounds a stop with a stuck batch; a new relay then delivers everything."""
    with broker_behind_proxy(tmp_path) as (bootstrap, proxy):
        topic = create_topic(bootstrap)
        ids = write_events(database_url, topic, 20_000, keys=50)
        common = ["--batch-size", "500", "--delivery-timeout", "30"]

        # A stop with a stuck batch ends when the grace period does (not the delivery timeout).
        graceful = start_relay(
            database_url, bootstrap, *common, "--grace-period", "2", log=tmp_path / "a.log"
        )
        try:
            wait_for_progress(database_url, len(ids), [graceful], below=len(ids) - 500)
            proxy.cut()
            time.sleep(0.5)
            graceful.send_signal(signal.SIGTERM)
            signalled = time.monotonic()
            code = graceful.wait(timeout=15)
            took = time.monotonic() - signalled
        finally:
            if graceful.poll() is None:
                graceful.kill()
                graceful.wait()
        print(f"\nstuck batch: stopped {took:.1f} s after SIGTERM (grace period 2 s)")
        assert code == 0, (tmp_path / "a.log").read_text()[-2000:]
        assert 1.5 < took < 6, f"stopped {took:.1f} s after SIGTERM with a 2 s grace period"

        # A second signal while the first waits for the stuck batch: exit at once.
        proxy.restore()
        impatient = start_relay(
            database_url, bootstrap, *common, "--grace-period", "20", log=tmp_path / "b.log"
        )
        try:
            left = unpublished(database_url)
            wait_for_progress(database_url, len(ids), [impatient], below=left - 500)
            proxy.cut()
            time.sleep(0.5)
            impatient.send_signal(signal.SIGTERM)
            time.sleep(0.5)
            assert impatient.poll() is None, "the first signal must wait for the stuck batch"
            impatient.send_signal(second)
            signalled = time.monotonic()
            code = impatient.wait(timeout=10)
            took = time.monotonic() - signalled
        finally:
            if impatient.poll() is None:
                impatient.kill()
                impatient.wait()
        assert code == 128 + second
        assert took < 2
        assert f"second {second.name}" in (tmp_path / "b.log").read_text()

        proxy.restore()
        assert unpublished(database_url) > 0
        result = run_relay(database_url, bootstrap, "--exit-when-idle", timeout=60)
        assert result.returncode == 0, result.stderr
        assert unpublished(database_url) == 0
        received = read_topic(bootstrap, topic, expect_ids=set(ids))
        check_delivery(received, ids)


def test_idle_relays_hand_shards_over_and_both_publish(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A second relay joining an idle one gets part of the shards; both then publish."""
    log_a, log_b = tmp_path / "a.log", tmp_path / "b.log"
    relay_a = start_relay(database_url, kafka_bootstrap, log=log_a)
    relay_b: subprocess.Popen[bytes] | None = None
    try:
        wait_for_log(log_a, lambda log: owned_shards(log) == SHARDS)
        relay_b = start_relay(database_url, kafka_bootstrap, log=log_b)
        # Rebalance interval 0.5 s: A lets go at its next rebalance, B picks up at one of its own.
        wait_for_log(log_b, lambda log: log_lines(log, "relay.started") != [])
        wait_until(
            lambda: (
                0 < owned_shards(log_a) < SHARDS
                and owned_shards(log_b) > 0
                and owned_shards(log_a) + owned_shards(log_b) == SHARDS
            ),
            timeout=5,
            interval=0.05,
        )

        topic = create_topic(kafka_bootstrap)
        ids = write_events(database_url, topic, 2_000, keys=50)
        wait_until(lambda: unpublished(database_url) == 0, timeout=30, interval=0.1)
        codes = [stop(relay_a), stop(relay_b)]
    finally:
        for relay in (relay_a, relay_b):
            if relay is not None and relay.poll() is None:
                relay.kill()
                relay.wait()
    assert codes == [0, 0]
    by_a, by_b = published_by(log_a), published_by(log_b)
    assert by_a > 0, (by_a, by_b)
    assert by_b > 0, (by_a, by_b)
    assert by_a + by_b == len(ids)

    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    assert check_delivery(received, ids) == 0
