"""Events delivered later (issue 32): written to the schedule, moved into the outbox by a relay
when they fall due, published from there like any event.

Real relays (subprocesses) against the real PostgreSQL and broker. The relays run with
``--retention``, so a published row stays in the published-events table with its
``published_at`` (the database's clock) and its ``created_at`` (its due time): every check of
time is made on the database's clock, and an event released twice would show as two rows.
"""

from __future__ import annotations

import datetime as dt
import signal
import subprocess
import time
from collections.abc import Sequence
from pathlib import Path

import psycopg
import pytest

import outbox
from outbox import testing
from outbox.testing import log_events
from tests.acceptance.relay_harness import (
    Received,
    create_topic,
    read_topic,
    start_relay,
    stop,
    wait_until,
)
from tests.acceptance.test_relay_metrics import get, metric, metrics_args, scrape, served_outbox

pytestmark = pytest.mark.kafka

#: Keep published rows (their publication time and due time) for the checks.
KEEP = ("--retention", "3600")
#: A wait ends when a scheduled event falls due, and a busy relay looks every second; the rest
#: is a claim and a publish. Generous, since timed assertions must not be tight on a shared
#: machine.
LATE_BOUND = 5.0


def schedule(
    database_url: str, topic: str, due_in: Sequence[float], keys: Sequence[str | None]
) -> list[str]:
    """One event per entry of ``due_in`` (seconds from now on the database's clock), of the
    matching key, scheduled with ``outbox.add_many`` in that order; returns their event ids."""
    events = [
        outbox.Event(topic, {"n": n}, key=key, delay=dt.timedelta(seconds=due))
        for n, (due, key) in enumerate(zip(due_in, keys, strict=True))
    ]
    with psycopg.connect(database_url) as conn:
        return [str(i) for i in outbox.add_many(conn, events)]


def cancel(database_url: str, event_id: str) -> bool:
    """Take a scheduled event back before it falls due (``outbox.cancel``)."""
    with psycopg.connect(database_url) as conn:
        return outbox.cancel(conn, event_id)


def write_now(database_url: str, topic: str, key: str, count: int) -> list[str]:
    """``count`` events of ``key`` for now, in order; their event ids."""
    events = [outbox.Event(topic, {"now": i}, key=key) for i in range(count)]
    with psycopg.connect(database_url) as conn:
        return [str(i) for i in outbox.add_many(conn, events)]


def one_value(database_url: str, statement: str, params: Sequence[object] = ()) -> object:
    with psycopg.connect(database_url) as conn:
        row = conn.execute(statement, params).fetchone()
    assert row is not None
    return row[0]


def published(database_url: str) -> int:
    return int(str(one_value(database_url, "SELECT count(*) FROM outbox_published")))


def scheduled(database_url: str) -> int:
    return int(str(one_value(database_url, "SELECT count(*) FROM outbox_scheduled")))


def lateness(database_url: str) -> list[tuple[str, float]]:
    """(event id, seconds from falling due to being published) of every published event."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, extract(epoch FROM published_at - created_at)::float8"
            " FROM outbox_published"
        ).fetchall()
    return [(r[0], float(r[1])) for r in rows]


def copies(database_url: str) -> dict[str, int]:
    """How many rows each event id has in the outbox and the published events together."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_id::text, count(*) FROM (SELECT event_id FROM outbox_events"
            " UNION ALL SELECT event_id FROM outbox_published) AS e GROUP BY event_id"
        ).fetchall()
    return {r[0]: int(r[1]) for r in rows}


def in_order(received: Sequence[Received], key: bytes) -> list[str]:
    """The first copies of ``key``'s events, in the order its partition holds them."""
    seen: list[str] = []
    for msg in sorted(received, key=lambda r: (r.partition, r.offset)):
        if msg.key == key and msg.event_id not in seen:
            seen.append(msg.event_id)
    return seen


def test_due_events_go_out_after_their_due_time_and_soon_after(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Events due 1 to 3 s from now, a relay running meanwhile: each published at or after its
    due time and within a few seconds of it, by the database's clock; none before."""
    topic = create_topic(kafka_bootstrap)
    due = [1.0 + i * 0.1 for i in range(21)]
    ids = schedule(database_url, topic, due, [f"k{i % 4}" for i in range(21)])
    log = tmp_path / "relay.log"
    relay = start_relay(database_url, kafka_bootstrap, *KEEP, log=log)
    try:
        time.sleep(0.5)
        assert published(database_url) == 0, "nothing is due yet"
        wait_until(lambda: published(database_url) == len(ids), 20)
    finally:
        assert stop(relay) == 0, log.read_text()
    late = dict(lateness(database_url))
    assert set(late) == set(ids)
    assert min(late.values()) >= 0, "published before it fell due"
    assert max(late.values()) < LATE_BOUND, sorted(late.values())[-3:]
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    assert {r.event_id for r in received} == set(ids)
    assert scheduled(database_url) == 0


def test_an_idle_relay_releases_an_event_scheduled_while_it_waits_on_time(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """A relay idle for a while (its waits under way) when events are scheduled 1.5 and 2.5 s
    ahead: its wait learns of them and ends when each falls due: published at or after its
    due time and soon after, by the database's clock."""
    topic = create_topic(kafka_bootstrap)
    log = tmp_path / "relay.log"
    relay = start_relay(database_url, kafka_bootstrap, *KEEP, log=log)
    try:
        wait_until(lambda: log_events(log.read_text(), "relay.started") != [], 15)
        time.sleep(1.0)  # idle: waiting for events
        ids = schedule(database_url, topic, [1.5, 2.5], ["k", "k"])
        wait_until(lambda: published(database_url) == len(ids), 20)
    finally:
        assert stop(relay) == 0, log.read_text()
    late = dict(lateness(database_url))
    assert set(late) == set(ids)
    assert min(late.values()) >= 0, "published before it fell due"
    assert max(late.values()) < LATE_BOUND, late


def test_a_waiting_event_holds_back_nothing_and_goes_after_its_key_once_due(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Key K: an event scheduled 3 s ahead, then events for now: those go first, at once. The
    relay stops; a second scheduled event falls due while events of K wait in the outbox: once
    a relay runs again, it goes after them, and before what is written after its release."""
    topic = create_topic(kafka_bootstrap, partitions=1)
    [later] = schedule(database_url, topic, [3.0], ["K"])
    now = write_now(database_url, topic, "K", 3)
    log = tmp_path / "relay.log"
    relay = start_relay(database_url, kafka_bootstrap, *KEEP, log=log)
    try:
        wait_until(lambda: published(database_url) == 3, 10)
        assert scheduled(database_url) == 1, "the immediate events did not wait for it"
        wait_until(lambda: published(database_url) == 4, 10)
    finally:
        assert stop(relay) == 0, log.read_text()

    [due_while_stopped] = schedule(database_url, topic, [0.5], ["K"])
    waiting = write_now(database_url, topic, "K", 2)  # in the outbox before it falls due
    time.sleep(1.0)
    relay = start_relay(database_url, kafka_bootstrap, *KEEP, log=log)
    try:
        wait_until(lambda: published(database_url) == 7, 10)
        after = write_now(database_url, topic, "K", 1)
        wait_until(lambda: published(database_url) == 8, 10)
    finally:
        assert stop(relay) == 0, log.read_text()
    expected = [*now, later, *waiting, due_while_stopped, *after]
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(expected))
    assert in_order(received, b"K") == expected


def test_a_cancelled_event_never_goes_out(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Cancelled before it fell due: not on the topic, in neither table, well past its due
    time; the event scheduled beside it goes out."""
    topic = create_topic(kafka_bootstrap)
    cancelled, kept = schedule(database_url, topic, [1.5, 1.5], ["a", "a"])
    log = tmp_path / "relay.log"
    relay = start_relay(database_url, kafka_bootstrap, *KEEP, log=log)
    try:
        assert cancel(database_url, cancelled)
        wait_until(lambda: published(database_url) == 1, 10)
        time.sleep(2.0)  # past its due time plus the release's look, and more
    finally:
        assert stop(relay) == 0, log.read_text()
    received = read_topic(kafka_bootstrap, topic, expect_ids={kept})
    assert {r.event_id for r in received} == {kept}
    assert copies(database_url) == {kept: 1}
    assert scheduled(database_url) == 0


def test_several_relays_publish_every_scheduled_event_once_in_due_order(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Three relays, 600 events over 10 keys falling due over 3 s: each delivered once (a clean
    run), each key's events in due order (ties in scheduling order), each released once."""
    topic = create_topic(kafka_bootstrap)
    count = 600
    # Scheduled out of due order: the order to expect is the due order.
    due = [1.0 + ((i * 7) % count) * 3.0 / count for i in range(count)]
    keys = [f"k{i % 10}" for i in range(count)]
    ids = schedule(database_url, topic, due, keys)
    relays = [
        start_relay(database_url, kafka_bootstrap, *KEEP, log=tmp_path / f"relay-{n}.log")
        for n in range(3)
    ]
    try:
        wait_until(lambda: published(database_url) == count, 30)
    finally:
        codes = [stop(relay) for relay in relays]
    assert codes == [0, 0, 0]
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    assert sorted(r.event_id for r in received) == sorted(ids), "lost or duplicated"
    assert set(copies(database_url).values()) == {1}
    by_due = [event for _due, _n, event in sorted(zip(due, range(count), ids, strict=True))]
    for key in {*keys}:
        mine = {e for e, k in zip(ids, keys, strict=True) if k == key}
        assert in_order(received, key.encode()) == [e for e in by_due if e in mine], key


def test_relays_restarted_and_killed_while_events_fall_due_lose_none_release_none_twice(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two relays; 2,000 events fall due over 4 s (batches of 50, so releases and claims are
    under way all along). One is SIGKILLed, the other stopped and restarted, then the killed
    one restarted: every event delivered, none released twice."""
    topic = create_topic(kafka_bootstrap)
    count = 2000
    ids = schedule(
        database_url,
        topic,
        [0.5 + 4.0 * i / count for i in range(count)],
        [f"k{i % 50}" for i in range(count)],
    )
    small = ("--batch-size", "50", *KEEP)
    relays: list[tuple[subprocess.Popen[bytes], Path]] = []

    def start(name: str) -> subprocess.Popen[bytes]:
        log = tmp_path / f"{name}.log"
        relays.append((start_relay(database_url, kafka_bootstrap, *small, log=log), log))
        return relays[-1][0]

    def started(proc: subprocess.Popen[bytes]) -> None:
        [log] = [path for p, path in relays if p is proc]
        wait_until(lambda: log_events(log.read_text(), "relay.started") != [], 15)

    a, b = start("a"), start("b")
    try:
        wait_until(lambda: published(database_url) > 300, 15, interval=0.02)
        a.send_signal(signal.SIGKILL)
        a.wait()
        assert stop(b) == 0
        started(b := start("b-again"))
        wait_until(lambda: published(database_url) > 1000, 15, interval=0.02)
        started(start("a-again"))
        wait_until(lambda: published(database_url) >= count, 30)
    finally:
        codes = {path.name: stop(proc) for proc, path in relays}
    assert codes == {"a.log": -signal.SIGKILL, "b.log": 0, "b-again.log": 0, "a-again.log": 0}
    assert scheduled(database_url) == 0
    assert copies(database_url) == dict.fromkeys(ids, 1), "released twice, or lost"
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    assert {r.event_id for r in received} == set(ids)


def test_the_schedule_has_gauges_of_its_own_and_the_backlog_counts_none_of_it(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """1,000 events due in an hour: the relay reports them as scheduled, with the next due
    time; the backlog and the oldest unpublished event (what OutboxLagging watches) stay 0."""
    topic = create_topic(kafka_bootstrap)
    schedule(database_url, topic, [3600.0 + i for i in range(1000)], ["k"] * 1000)
    first_due = float(
        str(one_value(database_url, "SELECT extract(epoch FROM min(due_at)) FROM outbox_scheduled"))
    )
    port = testing.free_port()
    base = f"http://127.0.0.1:{port}"
    log = tmp_path / "relay.log"
    relay = start_relay(database_url, kafka_bootstrap, *metrics_args(port), log=log)
    try:
        wait_until(lambda: get(f"{base}/healthz")[0] == 200, 20)
        wait_until(lambda: metric(base, "outbox_relay_scheduled_events") == 1000, 20)
        values = scrape(base)
        only = (("outbox", served_outbox(values)),)
        assert values["outbox_relay_next_due_timestamp_seconds"] == {only: first_due}
        assert values["outbox_relay_backlog_events"] == {only: 0}
        assert values["outbox_relay_oldest_unpublished_age_seconds"] == {only: 0}
        with psycopg.connect(database_url) as conn:
            conn.execute("DELETE FROM outbox_scheduled")
        wait_until(lambda: metric(base, "outbox_relay_scheduled_events") == 0, 20)
        assert "outbox_relay_next_due_timestamp_seconds" not in scrape(base)
    finally:
        assert stop(relay) == 0, log.read_text()
    assert published(database_url) == 0
