"""Many outboxes, one fleet of relays (``outbox-relay run --outboxes FILE``).

Every outbox is a database of its own on the suite's PostgreSQL server, every relay a real
process against it and the real broker. The guarantees under test: an outbox that fails (its
database dropped, its schema missing) fails alone and quietly while the others deliver; the
list file is read again while the relays run; a killed relay's outboxes are taken over with
nothing lost and each key in order; a relay connects only to the outboxes it serves.
"""

from __future__ import annotations

import signal
import subprocess
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from outbox import testing
from tests.acceptance.fleet_harness import (
    ContinuousWriter,
    Databases,
    OutboxDb,
    Relays,
    assert_delivered,
    fleet_args,
    log_lines,
    relay_sessions,
    served,
    unpublished_ids,
    write_list,
)
from tests.acceptance.relay_harness import (
    RELAY,
    create_topic,
    read_topic,
    unpublished,
    wait_until,
    write_events,
)
from tests.acceptance.test_relay_metrics import get, metrics_args, scrape

pytestmark = pytest.mark.kafka

#: Log levels that mean something went wrong.
ERRORS = {"error", "critical", "exception"}


@pytest.fixture
def dbs(pg_server: str, template_database: str) -> Iterator[Databases]:
    """This test's outbox databases, dropped at the end."""
    made = Databases(pg_server, template_database)
    yield made
    made.close()


@pytest.fixture
def relays(tmp_path: Path) -> Iterator[Relays]:
    """This test's relays, stopped (or killed) at the end."""
    started = Relays(tmp_path)
    yield started
    started.close()


def all_published(*outboxes: OutboxDb) -> bool:
    return all(unpublished(db.url) == 0 for db in outboxes)


def members(log: Path) -> int:
    """The fleet's size as the relay logging to ``log`` last saw it."""
    changed = log_lines(log, "fleet.members_changed")
    return int(changed[-1]["members"]) if changed else 0


def errors_of(log: Path, outbox: str) -> list[dict[str, object]]:
    return [line for line in log_lines(log, outbox=outbox) if line.get("level") in ERRORS]


def test_a_dropped_database_fails_alone_and_quietly(
    dbs: Databases, relays: Relays, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Three outboxes, one database dropped while the relay runs: the other two deliver what
    was written before and after, each key in order; the relay keeps running and says so in
    a line or two for that outbox, not a flood; the others log no error."""
    a, b, gone = dbs.create("a"), dbs.create("b"), dbs.create("gone")
    topics = {db.name: create_topic(kafka_bootstrap) for db in (a, b, gone)}
    ids = {db.name: write_events(db.url, topics[db.name], 200, keys=10) for db in (a, b, gone)}
    listed = write_list(tmp_path / "outboxes.toml", [a, b, gone])
    proc, log = relays.start(fleet_args(listed, kafka_bootstrap), "relay")

    wait_until(lambda: all_published(a, b, gone), timeout=30)
    dbs.drop(gone)
    dropped_at = time.monotonic()
    for db in (a, b):
        ids[db.name] += write_events(db.url, topics[db.name], 200, keys=10)
    wait_until(lambda: all_published(a, b), timeout=30)
    # Long enough for a flood to show: the outbox's reconnection tries back off from 0.5 s.
    wait_until(lambda: time.monotonic() - dropped_at > 10 or proc.poll() is not None, timeout=15)

    assert proc.poll() is None, log.read_text()[-3000:]
    for db in (a, b):
        received = read_topic(kafka_bootstrap, topics[db.name], expect_ids=set(ids[db.name]))
        assert_delivered(received, ids[db.name])
        assert errors_of(log, db.name) == [], f"outbox {db.name} logged errors"
    said = [
        line
        for line in errors_of(log, gone.name)
        if line["event"] in {"database.unavailable", "outbox.failing"}
    ]
    assert 1 <= len(said) <= 3, said
    assert len(errors_of(log, gone.name)) <= 3, errors_of(log, gone.name)


def test_an_outbox_without_its_schema_is_retried_until_it_has_one(
    dbs: Databases, relays: Relays, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """An outbox whose database lacks the schema at start: the relay starts, says once why
    that outbox fails (the schema, and how to apply it) while the others deliver; once the
    schema is applied, the outbox is served and its events delivered."""
    a, b, bare = dbs.create("a"), dbs.create("b"), dbs.create("bare", schema=False)
    topic = create_topic(kafka_bootstrap)
    ids = {db.name: write_events(db.url, topic, 100, keys=5) for db in (a, b)}
    listed = write_list(tmp_path / "outboxes.toml", [a, b, bare])
    proc, log = relays.start(fleet_args(listed, kafka_bootstrap), "relay")

    wait_until(lambda: all_published(a, b), timeout=30)
    wait_until(lambda: log_lines(log, "outbox.failing", outbox=bare.name), timeout=10)
    applied = subprocess.run(
        [*RELAY, "schema", "apply", "--database-url", bare.url],
        capture_output=True,
        text=True,
        timeout=60,
        check=False,
    )
    assert applied.returncode == 0, applied.stderr
    ids[bare.name] = write_events(bare.url, topic, 100, keys=5)
    # The retries back off (random, up to 2**attempt s): a few attempts are made by now.
    wait_until(lambda: all_published(bare), timeout=60)

    assert proc.poll() is None
    failing = log_lines(log, "outbox.failing", outbox=bare.name)
    assert len(failing) == 1, failing
    assert "schema apply" in failing[0]["error"], failing[0]
    assert "not installed" in failing[0]["error"], failing[0]
    assert log_lines(log, "outbox.recovered", outbox=bare.name)
    assert log_lines(log, "outbox.serving", outbox=bare.name)
    every = [i for db_ids in ids.values() for i in db_ids]
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(every))
    for db_ids in ids.values():
        assert_delivered([r for r in received if r.event_id in set(db_ids)], db_ids)
    for db in (a, b):
        assert errors_of(log, db.name) == []


def test_outboxes_added_and_removed_in_the_list_while_relays_run(
    dbs: Databases, relays: Relays, pg_server: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The list file is replaced: the added outbox is served and delivers; the removed one is
    released, its later events stay unpublished and the relay closes its sessions there."""
    kept, removed, added = dbs.create("kept"), dbs.create("removed"), dbs.create("added")
    topic = create_topic(kafka_bootstrap)
    listed = write_list(tmp_path / "outboxes.toml", [kept, removed])
    proc, log = relays.start(fleet_args(listed, kafka_bootstrap), "relay")
    before = write_events(removed.url, topic, 50, keys=5)
    wait_until(lambda: all_published(removed), timeout=30)

    write_list(listed, [kept, added])
    wait_until(
        lambda: any(
            line["reason"] == "removed from the list"
            for line in log_lines(log, "fleet.outbox_released", outbox=removed.name)
        ),
        timeout=15,
    )
    wait_until(lambda: removed.database not in relay_sessions(pg_server), timeout=15)
    later = write_events(removed.url, topic, 50, keys=5)
    new = write_events(added.url, topic, 50, keys=5)
    kept_ids = write_events(kept.url, topic, 50, keys=5)
    wait_until(lambda: all_published(added, kept), timeout=30)

    assert proc.poll() is None
    assert served(log) == {kept.name, added.name}
    reloaded = log_lines(log, "fleet.outboxes_reloaded")
    assert [(r["added"], r["removed"]) for r in reloaded] == [([added.name], [removed.name])]
    # The kept and added outboxes delivered what was written after the removed one's events:
    # had the relay still served that one, those would be published too.
    assert unpublished_ids(removed.url) == set(later)
    assert removed.database not in relay_sessions(pg_server)
    received = read_topic(kafka_bootstrap, topic, expect_ids={*before, *new, *kept_ids})
    assert not {r.event_id for r in received} & set(later), "a removed outbox's event was sent"
    for written in (before, new, kept_ids):
        assert_delivered([r for r in received if r.event_id in set(written)], written)


def test_a_list_gone_wrong_is_logged_once_and_the_last_good_one_kept(
    dbs: Databases, relays: Relays, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The list file turns invalid, then disappears, while the relay runs: one line for each
    (not one per pass), the outbox of the last good list is still served, and a good list
    again is read."""
    first, second = dbs.create("first"), dbs.create("second")
    topic = create_topic(kafka_bootstrap)
    listed = write_list(tmp_path / "outboxes.toml", [first])
    proc, log = relays.start(fleet_args(listed, kafka_bootstrap), "relay")
    wait_until(lambda: served(log) == {first.name}, timeout=30)

    listed.write_text("[[outbox]\n")
    wait_until(lambda: len(log_lines(log, "fleet.outboxes_invalid")) == 1, timeout=10)
    listed.unlink()
    wait_until(lambda: len(log_lines(log, "fleet.outboxes_invalid")) == 2, timeout=10)
    write_events(first.url, topic, 20, keys=4)
    wait_until(lambda: all_published(first), timeout=30)
    time.sleep(2.5)  # several passes (--rebalance-interval 0.5) with the file still gone
    errors = [line["error"] for line in log_lines(log, "fleet.outboxes_invalid")]
    assert len(errors) == 2, errors
    assert "not valid TOML" in errors[0]
    assert "cannot read the outbox list" in errors[1]

    write_list(listed, [first, second])
    wait_until(lambda: served(log) == {first.name, second.name}, timeout=15)
    assert proc.poll() is None


def test_a_relay_keeps_its_outboxes_while_the_fleet_database_is_gone(
    dbs: Databases, relays: Relays, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """The fleet database is dropped under a running relay: it logs that once, lets go of no
    outbox, and keeps publishing what is written to them."""
    fleet_db = dbs.create("fleet", schema=False)
    outboxes = [dbs.create(name) for name in ("kept1", "kept2")]
    topic = create_topic(kafka_bootstrap)
    listed = write_list(tmp_path / "outboxes.toml", outboxes)
    args = fleet_args(listed, kafka_bootstrap, "--fleet-database-url", fleet_db.url)
    proc, log = relays.start(args, "relay")
    names = {db.name for db in outboxes}
    wait_until(lambda: served(log) == names, timeout=30)

    dbs.drop(fleet_db)
    wait_until(lambda: bool(log_lines(log, "fleet.database_unavailable")), timeout=15)
    time.sleep(2.0)  # several passes with the fleet database gone
    for db in outboxes:
        write_events(db.url, topic, 20, keys=4)
    wait_until(lambda: all_published(*outboxes), timeout=30)
    assert not log_lines(log, "fleet.outbox_released"), "an outbox was let go"
    assert served(log) == names
    assert len(log_lines(log, "fleet.database_unavailable")) == 1
    assert proc.poll() is None


def test_a_killed_relays_outboxes_are_taken_over_with_nothing_lost(
    dbs: Databases, relays: Relays, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two relays share three outboxes while events are written to all three; one is
    SIGKILLed: every event reaches Kafka, each key's events first arrive in order, and the
    survivor serves all three."""
    outboxes = [dbs.create(name) for name in ("x", "y", "z")]
    topics = {db.url: create_topic(kafka_bootstrap) for db in outboxes}
    listed = write_list(tmp_path / "outboxes.toml", outboxes)
    args = fleet_args(listed, kafka_bootstrap, "--batch-size", "20")
    (first, first_log), (second, second_log) = (relays.start(args, f"relay-{i}") for i in (1, 2))
    names = {db.name for db in outboxes}
    # Both have joined and between them serve every outbox, each once.
    wait_until(
        lambda: (
            served(first_log) | served(second_log) == names
            and not served(first_log) & served(second_log)
            and members(first_log) == members(second_log) == 2
        ),
        timeout=30,
    )
    writer = ContinuousWriter([(db.url, topics[db.url]) for db in outboxes]).start()
    try:
        wait_until(lambda: writer.written() >= 600, timeout=30)
        victim, victim_log, survivor, survivor_log = (
            (first, first_log, second, second_log)
            if len(served(first_log)) >= len(served(second_log))
            else (second, second_log, first, first_log)
        )
        assert served(victim_log), "the relay to kill serves nothing"
        mine = [db for db in outboxes if db.name in served(victim_log)]
        # Mid-stream: the relay to kill has published some of its outboxes' events already.
        wait_until(
            lambda: any(len(unpublished_ids(db.url)) < len(writer.ids[db.url]) for db in mine),
            timeout=30,
        )
        victim.kill()
        assert victim.wait(timeout=10) == -signal.SIGKILL
        wait_until(lambda: served(survivor_log) == names, timeout=30)
        wait_until(lambda: writer.written() >= 1500, timeout=30)
    finally:
        writer.stop()
    wait_until(lambda: all_published(*outboxes), timeout=60)

    assert survivor.poll() is None
    assert_every_event_delivered(kafka_bootstrap, writer, topics)


def assert_every_event_delivered(
    bootstrap: str, writer: ContinuousWriter, topics: dict[str, str]
) -> None:
    """Every event the writer wrote to each outbox is on its topic, each key's in order."""
    for url, topic in topics.items():
        ids = writer.ids[url]
        assert_delivered(read_topic(bootstrap, topic, expect_ids=set(ids)), ids)


def test_a_relay_joining_mid_stream_takes_outboxes_over_live(
    dbs: Databases, relays: Relays, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """One relay serves four outboxes while events are written to all of them; a second relay
    joins and is given some of them: the first lets those go cleanly (no successor waits for
    its linger), every event reaches Kafka and each key's events first arrive in order."""
    outboxes = [dbs.create(name) for name in ("p", "q", "r", "s")]
    topics = {db.url: create_topic(kafka_bootstrap) for db in outboxes}
    listed = write_list(tmp_path / "outboxes.toml", outboxes)
    args = fleet_args(listed, kafka_bootstrap, "--batch-size", "20")
    first, first_log = relays.start(args, "relay-1")
    names = {db.name for db in outboxes}
    wait_until(lambda: served(first_log) == names, timeout=30)
    writer = ContinuousWriter([(db.url, topics[db.url]) for db in outboxes]).start()
    try:
        wait_until(lambda: writer.written() >= 400, timeout=30)
        _second, second_log = relays.start(args, "relay-2")
        wait_until(
            lambda: (
                members(first_log) == members(second_log) == 2
                and served(first_log) | served(second_log) == names
                and not served(first_log) & served(second_log)
                and bool(served(second_log))
            ),
            timeout=30,
        )
        wait_until(lambda: writer.written() >= 1200, timeout=30)
    finally:
        writer.stop()
    wait_until(lambda: all_published(*outboxes), timeout=60)

    given = served(second_log)
    released = {
        line["outbox"]
        for line in log_lines(first_log, "fleet.outbox_released")
        if line.get("reason") == "given to another"
    }
    assert released == given
    assert not log_lines(second_log, "shards.held_for_gone_relay"), "a clean leave holds nobody"
    assert first.poll() is None
    assert_every_event_delivered(kafka_bootstrap, writer, topics)


def test_metrics_name_each_outbox(
    dbs: Databases, relays: Relays, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """One relay, three outboxes and one without its schema: each served outbox is up and
    counts its own events by topic; the failing one is down and named by /readyz, which still
    says ready (only the broker decides)."""
    outboxes = [dbs.create(name) for name in ("one", "two", "three")]
    bare = dbs.create("bare", schema=False)
    topic, other = create_topic(kafka_bootstrap), create_topic(kafka_bootstrap)
    written = {}
    for count, db in enumerate(outboxes, 1):
        write_events(db.url, topic, 10 * count, keys=3)
        write_events(db.url, other, count, keys=1)
        written[db.name] = (10 * count, count)
    port = testing.free_port()
    base = f"http://127.0.0.1:{port}"
    listed = write_list(tmp_path / "outboxes.toml", [*outboxes, bare])
    proc, log = relays.start(fleet_args(listed, kafka_bootstrap, *metrics_args(port)), "relay")

    wait_until(lambda: all_published(*outboxes), timeout=30)
    wait_until(lambda: log_lines(log, "outbox.failing", outbox=bare.name), timeout=10)
    wait_until(lambda: get(f"{base}/metrics")[0] == 200, timeout=10)
    values = scrape(base)

    up = values["outbox_relay_outbox_up"]
    assert up == {
        **{(("outbox", db.name),): 1.0 for db in outboxes},
        (("outbox", bare.name),): 0.0,
    }
    published = values["outbox_relay_events_published_total"]
    for db in outboxes:
        on_topic, on_other = written[db.name]
        assert published[(("outbox", db.name), ("topic", topic))] == on_topic
        assert published[(("outbox", db.name), ("topic", other))] == on_other
    assert {dict(labels)["outbox"] for labels in published} <= {db.name for db in outboxes}
    assert values["outbox_relay_outboxes_served"] == {(): 4.0}
    assert values["outbox_relay_outbox_listed"] == {
        (("outbox", db.name),): 1.0 for db in [*outboxes, bare]
    }
    status, body = get(f"{base}/readyz")
    assert status == 200, body
    assert bare.name in body
    assert not any(db.name in body for db in outboxes), body
    assert proc.poll() is None


def test_each_outbox_database_has_only_its_relays_sessions(
    dbs: Databases, relays: Relays, pg_server: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two relays, four idle outboxes served by one relay each: once settled, each outbox
    database has the sessions of one relay (at most two), and the fleet database one fleet
    session per relay; not every relay connected to every outbox."""
    fleet_db = dbs.create("fleet", schema=False)
    outboxes = [dbs.create(f"idle{i}") for i in range(4)]
    listed = write_list(tmp_path / "outboxes.toml", outboxes)
    args = fleet_args(listed, kafka_bootstrap, "--fleet-database-url", fleet_db.url)
    logs = [relays.start(args, f"relay-{i}")[1] for i in (1, 2)]
    names = {db.name for db in outboxes}

    def settled() -> bool:
        sessions = relay_sessions(pg_server)
        return (
            all(members(log) == 2 for log in logs)
            and served(logs[0]) | served(logs[1]) == names
            and not served(logs[0]) & served(logs[1])
            and all(len(relay_ids(sessions.get(db.database, []))) == 1 for db in outboxes)
        )

    wait_until(settled, timeout=30)
    sessions = relay_sessions(pg_server)

    for db in outboxes:
        assert 1 <= len(sessions[db.database]) <= 2, sessions[db.database]
        assert len(relay_ids(sessions[db.database])) == 1, sessions[db.database]
    fleet = sessions[fleet_db.database]
    assert len(fleet) == 2, fleet
    assert all(name.startswith("outbox-relay fleet ") for name in fleet), fleet
    assert len(relay_ids(fleet)) == 2, fleet
    ours = {db.database for db in [fleet_db, *outboxes]}
    assert sum(len(sessions[d]) for d in ours) <= 2 * len(outboxes) + 2


def test_a_busy_outbox_given_two_relays_is_spread_over_both_by_its_shards(
    dbs: Databases, relays: Relays, pg_server: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """An outbox listed with ``relays = 2``: both relays of the fleet serve it, its shards are
    split between them, and its events are all delivered in key order."""
    busy = dbs.create("busy")
    topic = create_topic(kafka_bootstrap)
    listed = write_list(tmp_path / "outboxes.toml", [busy], relays=2)
    logs = [relays.start(fleet_args(listed, kafka_bootstrap), f"relay-{i}")[1] for i in (1, 2)]

    def owned(log: Path) -> int:
        lines = log_lines(log, "shards.rebalanced", outbox=busy.name)
        return int(lines[-1]["owned"]) if lines else 0

    wait_until(
        lambda: (
            all(served(log) == {busy.name} for log in logs)
            and owned(logs[0]) + owned(logs[1]) == 256
            and min(owned(logs[0]), owned(logs[1])) > 0
        ),
        timeout=30,
    )
    assert len(relay_ids(relay_sessions(pg_server)[busy.database])) == 2
    ids = write_events(busy.url, topic, 300, keys=30)
    wait_until(lambda: all_published(busy), timeout=30)
    assert_delivered(read_topic(kafka_bootstrap, topic, expect_ids=set(ids)), ids)


def relay_ids(application_names: list[str]) -> set[str]:
    """The relays behind sessions named ``outbox-relay <role> <relay id>``."""
    return {name.split(" ", 2)[2] for name in application_names}


def run_cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*RELAY, *args], capture_output=True, text=True, timeout=60, check=False)


def test_a_list_with_a_name_twice_exits_2_naming_it(
    dbs: Databases, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Two outboxes of one name in the list: exit 2 with one line naming the name."""
    a, b = dbs.create("same"), dbs.create("same")
    listed = write_list(tmp_path / "outboxes.toml", [a, b])
    result = run_cli(*fleet_args(listed, kafka_bootstrap)[len(RELAY) :])
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert "two outboxes are named 'same'" in message, message


def test_a_list_and_a_database_url_together_exit_2(
    dbs: Databases, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """--outboxes and --database-url both: exit 2, one line naming both options."""
    a = dbs.create("a")
    listed = write_list(tmp_path / "outboxes.toml", [a])
    args = fleet_args(listed, kafka_bootstrap, "--database-url", a.url)
    result = run_cli(*args[len(RELAY) :])
    assert result.returncode == 2, result.stderr
    message = result.stderr.strip()
    assert "\n" not in message, message
    assert "--outboxes" in message, message
    assert "--database-url" in message, message
