"""A consumer killed between its database commit and its offset commit: no side effect twice.

The consumer is a real process (``consumer_app.py``) against the real PostgreSQL and
Kafka-protocol broker. It SIGKILLs itself right after the database commit of one message, before
the loop stores that message's offset; the restarted consumer receives the message again, the
dedup record recognises it, and the handler is skipped.
"""

from __future__ import annotations

import json
import signal
import subprocess
import sys
import uuid
from collections.abc import Callable
from pathlib import Path
from typing import Any

import psycopg
import pytest
from confluent_kafka import Consumer, Message, Producer, TopicPartition

import outbox
from tests.acceptance.relay_harness import create_topic, stop, wait_until

pytestmark = pytest.mark.kafka

APP = Path(__file__).with_name("consumer_app.py")


def start_consumer(
    database_url: str, bootstrap: str, topic: str, name: str, log: Path, *extra: str
) -> subprocess.Popen[bytes]:
    """Start consumer_app.py; its output goes to ``log``."""
    with log.open("ab") as out:
        return subprocess.Popen(
            [
                sys.executable,
                str(APP),
                "--database-url",
                database_url,
                "--bootstrap-servers",
                bootstrap,
                "--topic",
                topic,
                "--name",
                name,
                *extra,
            ],
            stdout=out,
            stderr=subprocess.STDOUT,
        )


def stats_of(log: Path) -> dict[str, Any]:
    """The stats the consumer printed when it stopped."""
    lines = [line for line in log.read_text().splitlines() if line.startswith("STATS ")]
    assert len(lines) == 1, log.read_text()[-3000:]
    return dict(json.loads(lines[0].removeprefix("STATS ")))


Effect = tuple[str, int, int, int]  # message id, partition, offset, pid of the writer


def effects(database_url: str) -> list[Effect]:
    """Every side effect, or [] before the table exists."""
    with psycopg.connect(database_url) as conn:
        exists = conn.execute("SELECT to_regclass('effects') IS NOT NULL").fetchone()
        if not exists or not exists[0]:
            return []
        rows = conn.execute("SELECT message_id, kafka_partition, kafka_offset, pid FROM effects")
        return [(m, part, off, pid) for m, part, off, pid in rows]


def produce(bootstrap: str, topic: str, count: int) -> tuple[list[str], list[int]]:
    """``count`` messages with event_id headers over 10 keys on a 3-partition topic; returns
    the event ids and each partition's end offset (from the delivery reports: Tansu's
    watermark offsets are not reliable)."""
    ids = [str(uuid.uuid4()) for _ in range(count)]
    ends = [0, 0, 0]

    def delivered(err: object, msg: Message) -> None:
        assert err is None, err
        partition, offset = msg.partition(), msg.offset()
        assert partition is not None
        assert offset is not None
        ends[partition] = max(ends[partition], offset + 1)

    producer = Producer({"bootstrap.servers": bootstrap})
    for i, event_id in enumerate(ids):
        producer.produce(
            topic,
            value=f"message-{i}".encode(),
            key=f"key-{i % 10}".encode(),
            headers=[(outbox.EVENT_ID_HEADER, event_id.encode())],
            on_delivery=delivered,
        )
    assert producer.flush(30) == 0
    assert sum(ends) == count
    return ids, ends


def committed(bootstrap: str, group: str, topic: str) -> list[int]:
    """The offsets the group committed on partitions 0, 1, 2 of ``topic`` (0 where none): as
    offsets start at 0, also the number of messages before each."""
    consumer = Consumer({"bootstrap.servers": bootstrap, "group.id": group})
    try:
        offsets = consumer.committed([TopicPartition(topic, p) for p in range(3)], timeout=30)
    finally:
        consumer.close()
    return [max(tp.offset, 0) for tp in offsets]


@pytest.mark.parametrize("mode", [[], ["--async"]], ids=["ConsumeLoop", "AsyncConsumeLoop"])
def test_consumer_killed_after_its_database_commit_skips_the_redelivered_message(
    database_url: str,
    kafka_bootstrap: str,
    tmp_path: Path,
    record_property: Callable[[str, object], None],
    mode: list[str],
) -> None:
    """SIGKILL after the DB commit and before the offset commit; the restarted consumer gets
    the message again and skips it as a duplicate: exactly one side effect per message."""
    total, kill_after = 30, 10
    topic = create_topic(kafka_bootstrap)
    name = f"crash-{uuid.uuid4().hex[:8]}"
    ids, ends = produce(kafka_bootstrap, topic, total)

    first_log = tmp_path / "first.log"
    first = start_consumer(
        database_url,
        kafka_bootstrap,
        topic,
        name,
        first_log,
        # Slow enough that the offsets of earlier messages get committed (every 200 ms).
        "--kill-after-commits",
        str(kill_after),
        "--handler-delay",
        "0.1",
        *mode,
    )
    try:
        code = first.wait(timeout=90)
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    assert code == -signal.SIGKILL, first_log.read_text()[-3000:]
    (killed_line,) = [
        line for line in first_log.read_text().splitlines() if line.startswith("KILLING")
    ]
    assert killed_line.startswith(f"KILLING after commit {kill_after} of ")
    killed_id = killed_line.rsplit(" ", 1)[1]
    before = effects(database_url)
    assert len(before) == kill_after
    # The message of the killed transaction: its side effect is committed, its offset is not.
    (killed,) = [e for e in before if e[0] == killed_id]
    committed_at_kill = committed(kafka_bootstrap, name, topic)
    assert committed_at_kill[killed[1]] <= killed[2], "its offset must not be committed"

    second_log = tmp_path / "second.log"
    second = start_consumer(database_url, kafka_bootstrap, topic, name, second_log, *mode)
    try:
        wait_until(lambda: len(effects(database_url)) >= total, timeout=90, interval=0.2)
        # Consumed to the end (duplicates included) once the group's offsets reach the ends.
        wait_until(
            lambda: committed(kafka_bootstrap, name, topic) == ends, timeout=60, interval=0.5
        )
        code = stop(second, signal.SIGTERM, timeout=30)
    finally:
        if second.poll() is None:
            second.kill()
            second.wait()
    assert code == 0, second_log.read_text()[-3000:]
    stats = stats_of(second_log)
    redelivered = kill_after - sum(committed_at_kill)
    print(
        f"\nconsumer crash: {kill_after} side effects committed before the kill, "
        f"{redelivered} of them redelivered; restarted consumer: {stats}"
    )
    record_property("redelivered_after_kill", redelivered)
    record_property("restart_duplicates", stats["duplicates"])

    after = effects(database_url)
    assert len(after) == total
    assert sorted(e[0] for e in after) == sorted(ids), "one side effect per message"
    assert [e for e in after if e[0] == killed_id] == [killed], "redelivered, not reapplied"
    assert stats["duplicates"] == redelivered >= 1
    assert stats["processed"] == total - kill_after
    assert (stats["failures"], stats["dead_lettered"]) == (0, 0)
    assert {e[3] for e in after} == {first.pid, second.pid}
