"""Operating the outbox: status, dead letters (list, retry, discard) and replay, as commands."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import psycopg
import pytest

import outbox
from outbox_relay.config import RelaySettings
from outbox_relay.dead_letters import Selection, replay
from tests.acceptance.relay_harness import (
    broker_behind_proxy,
    create_topic,
    read_topic,
    run_relay,
    start_relay,
    stop,
    unpublished,
    wait_until,
    write_events,
)

CLI = [sys.executable, "-m", "outbox_relay"]


def cli(*args: str) -> subprocess.CompletedProcess[str]:
    return subprocess.run([*CLI, *args], capture_output=True, text=True, timeout=60, check=False)


def sql(
    database_url: str, statement: str, params: tuple[object, ...] = ()
) -> list[tuple[object, ...]]:
    with psycopg.connect(database_url) as conn:
        cursor = conn.execute(statement, params)
        rows = cursor.fetchall() if cursor.description else []
        conn.commit()
    return rows


def status_json(database_url: str, *extra: str) -> dict[str, object]:
    result = cli("status", "--database-url", database_url, "--json", *extra)
    assert result.returncode == 0, result.stderr
    data: dict[str, object] = json.loads(result.stdout)
    return data


def _shards_split(status: dict[str, object]) -> bool:
    """Every shard owned, and by both relays (the second one joins at a later rebalance)."""
    relays = status["relays"]
    assert isinstance(relays, list)
    shards = [relay["shards"] for relay in relays]
    return len(shards) == 2 and sum(shards) == 256 and all(shards)


def test_status_shows_backlog_retries_dead_letters_blocked_keys_and_relays(
    database_url: str, tmp_path: Path
) -> None:
    """With two live relays cut off from the broker, every figure of `status --json` equals the
    count computed here, and --max-lag sets the exit code."""
    with broker_behind_proxy(tmp_path) as (bootstrap, proxy):
        topic = create_topic(bootstrap)
        processes = [
            start_relay(
                database_url, bootstrap, "--relay-id", f"relay-{n}", log=tmp_path / f"relay-{n}.log"
            )
            for n in (1, 2)
        ]
        try:
            wait_until(lambda: _shards_split(status_json(database_url)), timeout=30)
            proxy.cut()
            write_events(database_url, topic, 40, keys=8)
            # Failing rows waiting for a retry (an hour away), one per key of keys 0..2, and
            # two dead letters of key-3 and key-4.
            sql(
                database_url,
                "UPDATE outbox_events SET attempts = 2, last_error = 'boom',"
                " next_attempt_at = now() + interval '1 hour'"
                " WHERE id IN (SELECT min(id) FROM outbox_events WHERE key IN"
                " ('key-0', 'key-1', 'key-2') GROUP BY key)",
            )
            sql(
                database_url,
                "UPDATE outbox_events SET attempts = 10, dead_lettered_at = now()"
                " WHERE id IN (SELECT min(id) FROM outbox_events WHERE key IN ('key-3', 'key-4')"
                " GROUP BY key)",
            )
            time.sleep(1.5)
            found = status_json(database_url)
            assert found["backlog"] == 38  # 40 written, 2 dead-lettered
            assert found["waiting_for_retry"] == 3
            assert found["dead_lettered"] == 2
            assert found["blocked_keys"] == 3  # keys 0..2 wait behind their failing row
            assert found["published_last_minute"] is None
            assert [t["backlog"] for t in found["backlog_by_topic"]] == [38]  # type: ignore[union-attr]
            assert sum(found["backlog_by_shard"].values()) == 38  # type: ignore[union-attr]
            relays = found["relays"]
            assert sorted(r["name"] for r in relays) == ["relay-1", "relay-2"]  # type: ignore[union-attr]
            assert sum(r["shards"] for r in relays) == 256  # type: ignore[union-attr]
            assert all(r["shards"] > 0 for r in relays)  # type: ignore[union-attr]
            blocking = status_json(database_url, "--on-dead-letter", "block")
            assert blocking["blocked_keys"] == 5  # keys 3 and 4 wait behind their dead letter
            table = cli("status", "--database-url", database_url)
            assert "dead-lettered                  2" in table.stdout
            assert "relay-1" in table.stdout
            assert (
                cli("status", "--database-url", database_url, "--max-lag", "3600").returncode == 0
            )
            lagging = cli("status", "--database-url", database_url, "--max-lag", "0")
            assert lagging.returncode == 6
            assert "--max-lag" in lagging.stderr
        finally:
            proxy.restore()
            for process in processes:
                stop(process)


def dead_letter(database_url: str, topic: str, count: int) -> list[tuple[int, str]]:
    """Write ``count`` events and dead-letter them; their (row id, event id)."""
    with psycopg.connect(database_url) as conn:
        ids = outbox.add_many(
            conn, [outbox.Event(topic, {"n": i}, key=f"k{i}") for i in range(count)]
        )
    sql(
        database_url,
        "UPDATE outbox_events SET attempts = 3, last_error = 'MSG_SIZE_TOO_LARGE',"
        " dead_lettered_at = now()",
    )
    rows = sql(database_url, "SELECT id, event_id::text FROM outbox_events ORDER BY id")
    assert [r[1] for r in rows] == [str(i) for i in ids]
    return [(int(r[0]), str(r[1])) for r in rows]  # type: ignore[call-overload]


def test_retry_publishes_the_dead_letter_with_its_original_event_id(
    database_url: str, kafka_bootstrap: str
) -> None:
    """`dead-letters retry --id` puts the event back with attempts reset; the relay publishes it
    under its original event_id; the retry is in the history."""
    topic = create_topic(kafka_bootstrap)
    (first, first_id), (second, _) = dead_letter(database_url, topic, 2)
    listed = cli("dead-letters", "list", "--database-url", database_url, "--json")
    assert [json.loads(line)["id"] for line in listed.stdout.splitlines()] == [first, second]
    retried = cli(
        "dead-letters",
        "retry",
        "--database-url",
        database_url,
        "--id",
        str(first),
        "--actor",
        "ops@test",
        "--reason",
        "topic fixed",
    )
    assert retried.returncode == 0, retried.stderr
    assert sql(
        database_url, "SELECT attempts, dead_lettered_at FROM outbox_events WHERE id = %s", (first,)
    ) == [(0, None)]
    assert run_relay(database_url, kafka_bootstrap, "--exit-when-idle").returncode == 0
    received = read_topic(kafka_bootstrap, topic, expect_ids={first_id})
    assert [m.event_id for m in received] == [first_id]
    history = cli("dead-letters", "list", "--database-url", database_url, "--history", "--json")
    entries = [json.loads(line) for line in history.stdout.splitlines()]
    assert [(e["action"], e["row_id"], e["actor"], e["reason"]) for e in entries] == [
        ("retry", first, "ops@test", "topic fixed")
    ]
    nothing = cli("dead-letters", "retry", "--database-url", database_url, "--id", str(first))
    assert nothing.returncode == 7


def test_discard_requires_a_reason_and_records_it(database_url: str, kafka_bootstrap: str) -> None:
    """`discard` without --reason is refused and changes nothing; with one, the row is gone and
    the log keeps the event, the actor and the reason."""
    topic = create_topic(kafka_bootstrap)
    [(row, event_id)] = dead_letter(database_url, topic, 1)
    refused = cli("dead-letters", "discard", "--database-url", database_url, "--id", str(row))
    assert refused.returncode == 2
    assert "--reason" in refused.stderr
    blank = cli(
        "dead-letters",
        "discard",
        "--database-url",
        database_url,
        "--id",
        str(row),
        "--reason",
        "  ",
    )
    assert blank.returncode == 2
    assert sql(database_url, "SELECT count(*) FROM outbox_events") == [(1,)]
    done = cli(
        "dead-letters",
        "discard",
        "--database-url",
        database_url,
        "--id",
        str(row),
        "--reason",
        "customer deleted",
        "--actor",
        "ops@test",
    )
    assert done.returncode == 0, done.stderr
    assert sql(database_url, "SELECT count(*) FROM outbox_events") == [(0,)]
    assert sql(
        database_url,
        "SELECT action, event_id::text, reason, actor, last_error FROM outbox_dead_letter_log",
    ) == [("discard", event_id, "customer deleted", "ops@test", "MSG_SIZE_TOO_LARGE")]


def test_replay_republishes_a_range_with_the_original_event_ids(
    database_url: str, kafka_bootstrap: str
) -> None:
    """With published rows retained, `replay --from-id/--to-id` sends exactly that range again
    under the same event ids; without retained rows it says so and exits 7."""
    topic = create_topic(kafka_bootstrap)
    ids = write_events(database_url, topic, 10, keys=3)
    assert (
        run_relay(
            database_url, kafka_bootstrap, "--exit-when-idle", "--retention", "3600"
        ).returncode
        == 0
    )
    rows = sql(database_url, "SELECT id, event_id::text FROM outbox_published ORDER BY id")
    assert [r[1] for r in rows] == ids
    chosen = rows[3:7]
    replayed = cli(
        "replay",
        "--database-url",
        database_url,
        "--from-id",
        str(chosen[0][0]),
        "--to-id",
        str(chosen[-1][0]),
    )
    assert replayed.returncode == 0, replayed.stderr
    assert (
        run_relay(
            database_url, kafka_bootstrap, "--exit-when-idle", "--retention", "3600"
        ).returncode
        == 0
    )
    received = read_topic(kafka_bootstrap, topic, expect_ids=set(ids))
    counts = {event_id: sum(m.event_id == event_id for m in received) for event_id in ids}
    assert counts == {event_id: 2 if event_id in {r[1] for r in chosen} else 1 for event_id in ids}
    sql(database_url, "DELETE FROM outbox_published")  # as the purge leaves it
    gone = cli("replay", "--database-url", database_url, "--since", "1h")
    assert gone.returncode == 7
    assert "--retention" in gone.stderr


def test_a_replayed_row_goes_out_before_a_later_row_of_its_key(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Issue 19's example. A running relay has drained the outbox and its scan floor sits
    above row X (key K); the operator replays X, and the application then commits a new row of
    K at once. On the topic, X's second copy comes before the new row."""
    topic = create_topic(kafka_bootstrap)
    ids = write_events(database_url, topic, 5, keys=1)
    relay = start_relay(
        database_url, kafka_bootstrap, "--retention", "3600", log=tmp_path / "relay.log"
    )
    try:
        wait_until(lambda: unpublished(database_url) == 0, timeout=30)
        time.sleep(2.5)  # two samples of the floor: it is now above every row
        settings = RelaySettings(database_url=database_url, kafka_bootstrap_servers="-").outbox
        row_x = int(sql(database_url, "SELECT min(id) FROM outbox_published")[0][0])  # type: ignore[call-overload]
        with psycopg.connect(database_url) as conn:
            assert replay(conn, settings, Selection(ids=[row_x])) == [row_x]
        [later] = write_events(database_url, topic, 1, keys=1)
        received = read_topic(kafka_bootstrap, topic, expect_ids={*ids, later})
    finally:
        assert stop(relay) == 0
    copies = [m.event_id for m in sorted(received, key=lambda m: m.offset)]
    assert copies.count(ids[0]) == 2, copies
    replayed_at = max(n for n, event_id in enumerate(copies) if event_id == ids[0])
    assert copies.index(later) > replayed_at, f"the later row overtook the replayed one: {copies}"


@pytest.mark.parametrize("args", [["replay"], ["dead-letters", "retry"]])
def test_commands_without_a_selection_are_refused(database_url: str, args: list[str]) -> None:
    """Replaying or retrying needs an explicit selection: no accidental 'everything'."""
    result = cli(*args, "--database-url", database_url)
    assert result.returncode == 2


def test_an_empty_replay_says_what_is_true(
    database_url: str, kafka_bootstrap: str, tmp_path: Path
) -> None:
    """Issue 29: a replay that matched nothing blamed retention, even with relays keeping every
    published row. With a relay that keeps them an hour: a range past the newest row, or of a
    topic nothing went to, has no events and the message says that; a range whose rows are not
    published yet says that. Neither points at --retention."""
    topic = create_topic(kafka_bootstrap)
    write_events(database_url, topic, 5, keys=1)
    relay = start_relay(
        database_url, kafka_bootstrap, "--retention", "1h", log=tmp_path / "relay.log"
    )
    try:
        wait_until(lambda: unpublished(database_url) == 0, timeout=30)
        [(newest,)] = sql(database_url, "SELECT max(id) FROM outbox_published")
        with psycopg.connect(database_url) as conn:  # dead-lettered before the relay can see it
            [event_id] = outbox.add_many(conn, [outbox.Event(topic, {"n": 5}, key="key-0")])
            conn.execute(
                "UPDATE outbox_events SET attempts = 3, dead_lettered_at = now()"
                " WHERE event_id = %s",
                (event_id,),
            )
        [(dead,)] = sql(
            database_url, "SELECT id FROM outbox_events WHERE event_id = %s", (event_id,)
        )
        beyond = cli("replay", "--database-url", database_url, "--from-id", f"{newest}00")
        url = ["--database-url", database_url]
        no_topic = cli("replay", *url, "--since", "30m", "--topic", "nope")
        pending = cli("replay", "--database-url", database_url, "--from-id", str(dead))
    finally:
        assert stop(relay) == 0
    assert beyond.returncode == no_topic.returncode == pending.returncode == 7
    assert beyond.stderr.strip() == "Error: no events in that range"
    assert no_topic.stderr.strip() == "Error: no events of topic 'nope' in that range"
    assert "nothing to replay: 1 event is not published yet in that range" in pending.stderr
    assert "--retention" not in beyond.stderr + no_topic.stderr + pending.stderr


def test_an_empty_history_says_so(database_url: str) -> None:
    """`dead-letters list --history` with nothing logged prints a line, as `dead-letters list`
    does with no dead letter (it printed nothing); with --json it prints no line at all."""
    empty = cli("dead-letters", "list", "--database-url", database_url, "--history")
    assert empty.returncode == 0, empty.stderr
    assert empty.stdout == "no retries or discards logged\n"
    listed = cli("dead-letters", "list", "--database-url", database_url)
    assert listed.stdout == "no dead letters\n"
    as_json = cli("dead-letters", "list", "--database-url", database_url, "--history", "--json")
    assert as_json.returncode == 0, as_json.stderr
    assert as_json.stdout == ""


def test_the_history_shows_the_rows_selected(database_url: str) -> None:
    """`dead-letters list --history` honours the selection: --id names rows, --topic and --key
    their event, --since when the action was logged (it listed the whole log whatever was
    asked)."""
    rows = dead_letter(database_url, "orders", 2)
    for row, _ in rows:
        discarded = cli(
            "dead-letters", "discard", "--database-url", database_url, "--id", str(row),
            "--reason", "test",
        )  # fmt: skip
        assert discarded.returncode == 0, discarded.stderr

    def logged(*selection: str) -> list[int]:
        listed = cli(
            "dead-letters", "list", "--database-url", database_url, "--history", "--json",
            *selection,
        )  # fmt: skip
        assert listed.returncode == 0, listed.stderr
        return [json.loads(line)["row_id"] for line in listed.stdout.splitlines()]

    first, second = (row for row, _ in rows)
    assert logged() == [second, first]
    assert logged("--id", str(first)) == [first]
    assert logged("--key", "k1") == [second]
    assert logged("--topic", "payments") == []
    assert logged("--since", "1h") == [second, first]
    assert logged("--until", "1h") == []
