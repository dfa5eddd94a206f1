"""The relay under faults, as a real subprocess against real servers: poison rows, a missing topic,
a broker outage, killed database sessions, and an idle relay that must sleep yet wake at once."""

from __future__ import annotations

import os
import signal
import subprocess
import time
from collections import Counter
from collections.abc import Callable, Sequence
from pathlib import Path
from typing import Any

import psycopg
import pytest

import outbox
from outbox import testing
from tests.acceptance.relay_harness import (
    Received,
    broker_behind_proxy,
    create_topic,
    last_copy_order_violations,
    per_key_order_violations,
    read_topic,
    run_relay,
    start_relay,
    stop,
    unpublished,
    wait_until,
    write_events,
)

pytestmark = pytest.mark.kafka

#: Above the producer's message.max.bytes (1,100,000, see outbox_relay/kafka.py).
POISON_BYTES = 2_000_000


# Helpers of this file


def _insert_raw(database_url: str, topic: str, key: str, payload: bytes) -> str:
    """Insert a row with plain SQL, bypassing the writer's checks; returns its event id."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "INSERT INTO outbox_events (event_id, topic, key, payload)"
            " VALUES (gen_random_uuid(), %s, %s, %s) RETURNING event_id::text",
            (topic, key.encode(), payload),
        ).fetchone()
    assert row is not None
    return str(row[0])


def _write_keyed(database_url: str, topic: str, key: str, count: int) -> list[str]:
    """``count`` events of one key, through the writer; returns their event ids in order."""
    events = [outbox.Event(topic, {"key": key, "n": i}, key=key) for i in range(count)]
    with psycopg.connect(database_url) as conn:
        return [str(i) for i in outbox.add_many(conn, events)]


def _row(database_url: str, event_id: str) -> dict[str, Any]:
    """The bookkeeping columns of one outbox row."""
    with psycopg.connect(database_url) as conn:
        cur = conn.execute(
            "SELECT attempts, last_error, published_at, dead_lettered_at FROM outbox_events"
            " WHERE event_id = %s",
            (event_id,),
        )
        values = cur.fetchone()
        assert values is not None, f"row {event_id} is gone"
        assert cur.description is not None
        return {col.name: value for col, value in zip(cur.description, values, strict=True)}


def _unpublished_among(database_url: str, event_ids: Sequence[str]) -> int:
    """How many of these events are still in the table and not published."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute(
            "SELECT count(*) FROM outbox_events"
            " WHERE event_id = ANY(%s::uuid[]) AND published_at IS NULL",
            (list(event_ids),),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _rows_left(database_url: str) -> int:
    """Rows still in the table (published rows are deleted with the default retention 0)."""
    with psycopg.connect(database_url) as conn:
        row = conn.execute("SELECT count(*) FROM outbox_events").fetchone()
    assert row is not None
    return int(row[0])


def _named(log: list[dict[str, Any]], event: str) -> list[dict[str, Any]]:
    return [line for line in log if line.get("event") == event]


def _wait(
    proc: subprocess.Popen[bytes],
    log_path: Path,
    predicate: Callable[[], object],
    timeout: float,
    what: str,
    interval: float = 0.1,
) -> None:
    """wait_until for a running relay: fails at once if it exits, showing its last log lines."""
    deadline = time.monotonic() + timeout
    while not predicate():
        problem = None
        if proc.poll() is not None:
            problem = f"the relay exited with {proc.returncode} while waiting for {what}"
        elif time.monotonic() > deadline:
            problem = f"{what}: not within {timeout} s"
        if problem:
            tail = "\n".join(log_path.read_text().splitlines()[-15:])
            raise AssertionError(f"{problem}; relay log ends with:\n{tail}")
        time.sleep(interval)


def _started(log_path: Path) -> bool:
    """The relay logged its first rebalance: it owns its shards and is waiting or working."""
    return bool(testing.log_events(log_path.read_text(), "shards.rebalanced"))


def _cpu_seconds(pid: int) -> float:
    """User + system CPU time a process has used so far, from /proc/<pid>/stat."""
    stat = Path(f"/proc/{pid}/stat").read_text()
    fields = stat.rsplit(")", 1)[1].split()
    # after "pid (comm)": state is field 3, utime 14 and stime 15 (1-based, man 5 proc)
    utime, stime = int(fields[11]), int(fields[12])
    return (utime + stime) / os.sysconf("SC_CLK_TCK")


def _check_delivery(
    received: Sequence[Received], written: Sequence[str], label: str
) -> Counter[str]:
    """Every written id is on the topic and per-key order holds; returns the duplicate counts."""
    counts = Counter(r.event_id for r in received)
    missing = [event_id for event_id in written if event_id not in counts]
    assert not missing, f"{label}: {len(missing)} events lost, e.g. {missing[:3]}"
    assert per_key_order_violations(received, written) == []
    duplicates = Counter({k: n - 1 for k, n in counts.items() if n > 1})
    print(f"{label}: {len(written)} events, {sum(duplicates.values())} duplicates")
    return duplicates


# 1. Rows Kafka refuses


def _poison_scenario(database_url: str, topic: str) -> tuple[str, list[str], list[str], list[str]]:
    """A too-large 'poison' row, other keys' events, later 'poison' events, more other events.

    Returns (poison id, other keys' ids, later poison ids, all ids in insertion order).
    """
    poison = _insert_raw(database_url, topic, "poison", b"x" * POISON_BYTES)
    others = write_events(database_url, topic, 40, keys=4)
    later = _write_keyed(database_url, topic, "poison", 5)
    others += write_events(database_url, topic, 20, keys=4)
    return poison, others, later, [poison, *others[:40], *later, *others[40:]]


def test_poison_row_is_dead_lettered_and_later_rows_of_its_key_proceed(
    database_url: str, kafka_bootstrap: str
) -> None:
    """A row too large for Kafka is dead-lettered with its error; everything else is delivered."""
    topic = create_topic(kafka_bootstrap)
    poison, others, later, ordered = _poison_scenario(database_url, topic)

    result = run_relay(database_url, kafka_bootstrap, "--max-attempts", "3", "--exit-when-idle")

    assert result.returncode == 0, result.stderr
    row = _row(database_url, poison)
    assert row["dead_lettered_at"] is not None
    assert row["published_at"] is None
    assert row["attempts"] >= 1
    assert "MSG_SIZE_TOO_LARGE" in row["last_error"]
    assert "too large" in row["last_error"].lower()
    assert unpublished(database_url) == 0
    dead = testing.log_events(result.stderr, "event.dead_lettered")
    assert len(dead) == 1
    assert "MSG_SIZE_TOO_LARGE" in dead[0]["error"]

    received = read_topic(kafka_bootstrap, topic, expect_ids={*others, *later})
    assert poison not in {r.event_id for r in received}
    _check_delivery(received, [i for i in ordered if i != poison], "poison/proceed")


def test_poison_row_blocks_its_key_when_dead_letters_block(
    database_url: str, kafka_bootstrap: str
) -> None:
    """With --on-dead-letter block, later rows of the poison key wait while other keys flow."""
    topic = create_topic(kafka_bootstrap)
    poison, others, later, ordered = _poison_scenario(database_url, topic)

    result = run_relay(
        database_url,
        kafka_bootstrap,
        "--max-attempts",
        "3",
        "--on-dead-letter",
        "block",
        "--exit-when-idle",
    )

    assert result.returncode == 0, result.stderr
    assert _row(database_url, poison)["dead_lettered_at"] is not None
    for event_id in later:
        row = _row(database_url, event_id)
        assert row["published_at"] is None
        assert row["dead_lettered_at"] is None
        assert row["attempts"] == 0
    assert unpublished(database_url) == len(later)

    received = read_topic(kafka_bootstrap, topic, expect_ids=set(others))
    on_kafka = {r.event_id for r in received}
    assert poison not in on_kafka
    assert not on_kafka & set(later)
    _check_delivery(received, [i for i in ordered if i in set(others)], "poison/block")


def test_row_for_a_missing_topic_is_retried_then_dead_lettered(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A row for a missing topic fails as a row error, well before the delivery timeout."""
    # Tansu creates topics on demand, like Kafka's default auto.create.topics.enable=true; the
    # producer can ask it not to (allow.auto.create.topics=false), which Tansu honours.
    topic = create_topic(kafka_bootstrap)
    missing = testing.unique_name("missing").replace("_", "-")
    delivery_timeout = 10.0
    log_path = tmp_path / "relay.log"
    proc = start_relay(
        database_url,
        kafka_bootstrap,
        "--max-attempts",
        "3",
        "--delivery-timeout",
        str(delivery_timeout),
        "--kafka-config",
        "allow.auto.create.topics=false",
        log=log_path,
    )
    try:
        _wait(proc, log_path, lambda: _started(log_path), 30, "start-up")
        first = write_events(database_url, topic, 10, keys=2)
        lost = _insert_raw(database_url, missing, "lost", b'{"to": "nowhere"}')
        after = _write_keyed(database_url, topic, "lost", 3)
        rest = write_events(database_url, topic, 10, keys=2)
        written_at = time.monotonic()
        _wait(
            proc,
            log_path,
            lambda: _row(database_url, lost)["dead_lettered_at"] is not None,
            30,
            "the dead letter",
        )
        dead_after = time.monotonic() - written_at
        _wait(proc, log_path, lambda: unpublished(database_url) == 0, 30, "the drain")
    finally:
        code = stop(proc)
    assert code == 0

    row = _row(database_url, lost)
    assert row["attempts"] == 3
    assert "UNKNOWN_TOPIC" in row["last_error"]
    print(f"missing topic: dead-lettered after 3 attempts in {dead_after:.1f} s")
    # A timeout instead would count as a broker failure: no attempt, the batch held meanwhile.
    assert dead_after < 0.8 * delivery_timeout
    log = testing.log_events(log_path.read_text())
    assert not _named(log, "kafka.unavailable")
    assert len(_named(log, "event.dead_lettered")) == 1

    received = read_topic(kafka_bootstrap, topic, expect_ids={*first, *after, *rest})
    _check_delivery(received, [*first, *after, *rest], "missing topic")


# 2. Broker outage


def test_relay_rides_out_a_broker_outage_and_drains_by_itself(
    database_url: str, tmp_path: Path
) -> None:
    """A 12 s broker outage: nothing marked published, one log line, then a full drain."""
    log_path = tmp_path / "relay.log"
    with broker_behind_proxy(tmp_path) as (bootstrap, proxy):
        topic = create_topic(bootstrap)
        before = write_events(database_url, topic, 3000, keys=20)
        proc = start_relay(
            database_url,
            bootstrap,
            "--delivery-timeout",
            "3",
            "--batch-size",
            "200",
            log=log_path,
        )
        try:
            _wait(
                proc,
                log_path,
                lambda: _rows_left(database_url) < len(before),
                30,
                "the first publication",
                interval=0.02,
            )
            proxy.cut()
            cut_at = time.monotonic()
            # The batch in flight at the cut may still record rows the broker acknowledged
            # just before it; after delivery timeout + the publisher's 5 s margin, nothing may.
            settled_at = cut_at + 3 + 5 + 0.5
            during: list[str] = []
            left_after_settling: set[int] = set()
            while (now := time.monotonic()) < cut_at + 12:
                if len(during) < 200 and now > cut_at + 1 + len(during) / 40:
                    during += write_events(database_url, topic, 50, keys=20)
                assert proc.poll() is None, "the relay died during the outage"
                assert _unpublished_among(database_url, during) == len(during)
                if now > settled_at:
                    left_after_settling.add(_rows_left(database_url))
                time.sleep(0.25)
            # One more sample, still in the outage: on a loaded machine one slow pass of the
            # loop can step from before settled_at to past the end, leaving no sample at all.
            left_after_settling.add(_rows_left(database_url))
            assert len(left_after_settling) == 1, "rows were marked published during the outage"
            outage_log = testing.log_events(log_path.read_text())
            proxy.restore()
            restored_at = time.monotonic()

            _wait(
                proc,
                log_path,
                lambda: unpublished(database_url) == 0,
                90,
                "the drain after the outage",
                interval=0.2,
            )
            drained_in = time.monotonic() - restored_at
        finally:
            code = stop(proc)
        assert code == 0

        log = testing.log_events(log_path.read_text())
        unavailable = _named(outage_log, "kafka.unavailable")
        assert len(unavailable) == 1, unavailable
        assert len(_named(log, "kafka.unavailable")) == 1
        assert _named(log, "kafka.available")
        relay_lines = Counter(line["event"] for line in log if line.get("logger") != "librdkafka")
        librdkafka_lines = sum(1 for line in log if line.get("logger") == "librdkafka")
        print(
            f"outage: drained {drained_in:.1f} s after restore; relay log {dict(relay_lines)}; "
            f"{librdkafka_lines} librdkafka lines"
        )
        assert sum(relay_lines.values()) < 30, "relay log spam during the outage"
        assert librdkafka_lines < 200, "librdkafka log spam during the outage"

        written = [*before, *during]
        received = read_topic(bootstrap, topic, expect_ids=set(written))
        _check_delivery(received, written, "broker outage")


# 3. Database sessions terminated


def _terminate_relay_sessions(database_url: str) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE 'outbox-relay%%' AND datname = current_database()"
        ).fetchall()
    return sum(1 for (ok,) in rows if ok)


def test_relay_survives_its_database_sessions_being_terminated(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Killed sessions mid-drain: the relay reconnects by itself and nothing is lost."""
    topic = create_topic(kafka_bootstrap)
    written = write_events(database_url, topic, 30_000, keys=100)
    log_path = tmp_path / "relay.log"
    proc = start_relay(database_url, kafka_bootstrap, "--batch-size", "25", log=log_path)
    try:
        _wait(
            proc,
            log_path,
            lambda: _rows_left(database_url) < len(written),
            30,
            "the first publication",
            interval=0.02,
        )
        killed, left = [], []
        for _ in range(3):
            killed.append(_terminate_relay_sessions(database_url))
            left.append(_rows_left(database_url))
            time.sleep(0.5)  # a quiet machine drains the backlog in about 2 s
        print(f"terminated sessions: rows left at each termination {left}")
        assert killed[0] >= 1
        assert left[-1] > 0, "the backlog drained before the last termination; make it larger"
        _wait(proc, log_path, lambda: unpublished(database_url) == 0, 90, "the drain", 0.2)
    finally:
        code = stop(proc)
    assert code == 0

    log = testing.log_events(log_path.read_text())
    names = [line.get("event") for line in log]
    assert "database.unavailable" in names
    assert "database.reconnected" in names
    assert names.index("database.unavailable") < names.index("database.reconnected")
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(written))
    duplicates = _check_delivery(received, written, "terminated sessions")
    print(
        f"terminated sessions: killed {killed} backends, "
        f"{names.count('database.unavailable')} unavailable / "
        f"{names.count('database.reconnected')} reconnected lines, "
        f"{len(duplicates)} events duplicated ({sum(duplicates.values())} extra copies)"
    )


def _shards_owned(log_path: Path) -> int:
    lines = testing.log_events(log_path.read_text(), "shards.rebalanced")
    return int(lines[-1]["owned"]) if lines else 0


def _sessions_of(database_url: str, relay_id: str, state: str | None = None) -> int:
    with psycopg.connect(database_url, autocommit=True) as conn:
        row = conn.execute(
            "SELECT count(*) FROM pg_stat_activity WHERE application_name LIKE %s"
            " AND datname = current_database() AND (%s::text IS NULL OR state = %s)",
            (f"outbox-relay % {relay_id}", state, state),
        ).fetchone()
    assert row is not None
    return int(row[0])


def _terminate_sessions_of(database_url: str, relay_id: str) -> None:
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute(
            "SELECT pg_terminate_backend(pid) FROM pg_stat_activity"
            " WHERE application_name LIKE %s AND datname = current_database()",
            (f"outbox-relay % {relay_id}",),
        )


def test_a_cut_off_relays_late_copies_never_land_after_its_successors(
    database_url: str, tmp_path: Path
) -> None:
    """A zombie relay: its batch waits in its producer's queue (the broker is unreachable) when
    its database sessions are terminated, so its rows and its shards are free while librdkafka
    still holds their messages, for up to --delivery-timeout. It is paused (SIGSTOP) meanwhile,
    a second relay takes over, and the first resumes 4 s later and delivers its queue.

    Whatever lands twice, each event's last copy must still be in commit order (a compacted
    topic keeps the last copy of a key): the successor must not publish the zombie's rows
    while the zombie's copies can still arrive. Found by the chaos test on Apache Kafka."""
    with broker_behind_proxy(tmp_path) as (bootstrap, proxy):
        topic = create_topic(bootstrap)
        zombie_log, successor_log = tmp_path / "zombie.log", tmp_path / "successor.log"
        timeouts = ("--delivery-timeout", "8", "--batch-size", "100")
        zombie = start_relay(
            database_url, bootstrap, "--relay-id", "zombie", *timeouts, log=zombie_log
        )
        successor: subprocess.Popen[bytes] | None = None
        try:
            _wait(zombie, zombie_log, lambda: _shards_owned(zombie_log) > 0, 30, "its shards")
            proxy.cut()
            written = write_events(database_url, topic, 400, keys=4)
            _wait(
                zombie,
                zombie_log,
                lambda: _sessions_of(database_url, "zombie", "idle in transaction") > 0,
                30,
                "a batch in flight",
                interval=0.02,
            )
            time.sleep(0.5)  # the batch is in librdkafka's queue
            zombie.send_signal(signal.SIGSTOP)
            _terminate_sessions_of(database_url, "zombie")
            wait_until(lambda: _sessions_of(database_url, "zombie") == 0, timeout=10)
            proxy.restore()
            successor = start_relay(
                database_url, bootstrap, "--relay-id", "successor", *timeouts, log=successor_log
            )
            time.sleep(4)
            zombie.send_signal(signal.SIGCONT)
            _wait(successor, successor_log, lambda: unpublished(database_url) == 0, 60, "drain")
        finally:
            zombie.send_signal(signal.SIGCONT)
            codes = [stop(p) for p in (zombie, successor) if p is not None]
        assert codes == [0, 0]
        received = read_topic(bootstrap, topic, expect_ids=set(written))
        duplicates = _check_delivery(received, written, "zombie relay")
        assert duplicates, "the zombie's queued copies never landed: the test proved nothing"
        assert last_copy_order_violations(received, written) == []


# 4. Idle relay


def test_idle_relay_sleeps_and_wakes_for_a_lone_event(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """An idle relay uses almost no CPU, yet a lone event is on Kafka long before the poll
    interval (30 s) would have claimed it: the wait inside PostgreSQL saw it (the wake-up)."""
    topic = create_topic(kafka_bootstrap)
    log_path = tmp_path / "relay.log"
    proc = start_relay(
        database_url,
        kafka_bootstrap,
        "--poll-interval",
        "30",
        "--rebalance-interval",
        "30",
        log=log_path,
    )
    try:
        _wait(proc, log_path, lambda: _started(log_path), 30, "start-up")
        time.sleep(1.0)  # let start-up work finish
        cpu_before = _cpu_seconds(proc.pid)
        time.sleep(5.0)
        cpu_used = _cpu_seconds(proc.pid) - cpu_before
        assert proc.poll() is None

        written_at = time.monotonic()
        written = write_events(database_url, topic, 1, keys=1)
        _wait(proc, log_path, lambda: unpublished(database_url) == 0, 10, "the wake-up", 0.01)
        latency = time.monotonic() - written_at
    finally:
        code = stop(proc)
    assert code == 0
    print(f"idle relay: {cpu_used:.3f} s CPU over 5 s; commit to published in {latency:.3f} s")
    assert cpu_used < 0.5
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(written))
    assert {r.event_id for r in received} == set(written)
