"""A small consumer application for the acceptance tests, run as ``python consumer_app.py``.

It runs a :class:`outbox.consumer.ConsumeLoop` (with ``--async``, an
:class:`outbox.consumer_async.AsyncConsumeLoop` on an ``AsyncSession``) whose handler writes one
row per message into the side-effect table ``effects`` (created if missing; no unique
constraint, so a side effect applied twice shows as two rows). It stops on SIGTERM and then
prints its stats as one JSON line, ``STATS {...}``, on stdout.

``--kill-after-commits N`` makes it SIGKILL itself right after the database commit of its Nth
transaction (an ``after_commit`` session event), printing ``KILLING after commit N of <id>``:
the side effects and dedup record of that transaction are committed, its Kafka offset is not
stored, let alone committed.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import os
import signal
import sys
import time
from pathlib import Path

import sqlalchemy as sa
from confluent_kafka import Message
from sqlalchemy import event
from sqlalchemy.orm import Session, sessionmaker

if __package__ in (None, ""):  # run as a script: make the project importable
    sys.path.insert(0, str(Path(__file__).resolve().parents[2]))

from outbox import urls
from outbox.consumer import ConsumeLoop, ConsumerSettings, event_id_or_position

#: Tansu answers a group join after about half the session timeout (23 s with the default 45 s);
#: offsets stored after each commit are committed every 200 ms.
KAFKA_CONFIG = {
    "session.timeout.ms": "6000",
    "heartbeat.interval.ms": "500",
    "auto.commit.interval.ms": "200",
}

EFFECTS_DDL = (
    "CREATE TABLE IF NOT EXISTS effects ("
    " message_id text NOT NULL, payload text NOT NULL,"
    " kafka_partition int NOT NULL, kafka_offset bigint NOT NULL, pid int NOT NULL)"
)


def record(session: Session, message: Message) -> None:
    """The side effect: one row in ``effects``."""
    value = message.value()
    assert value is not None
    session.execute(
        sa.text("INSERT INTO effects VALUES (:id, :payload, :partition, :offset, :pid)"),
        {
            "id": event_id_or_position(message),
            "payload": value.decode(errors="replace"),
            "partition": message.partition(),
            "offset": message.offset(),
            "pid": os.getpid(),
        },
    )


def parse_args(argv: list[str] | None = None) -> argparse.Namespace:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("--database-url", required=True)
    parser.add_argument("--bootstrap-servers", required=True)
    parser.add_argument("--topic", required=True)
    parser.add_argument("--name", required=True, help="consumer name and group")
    parser.add_argument("--batch-size", type=int, default=1)
    parser.add_argument("--kill-after-commits", type=int, default=0)
    parser.add_argument("--handler-delay", type=float, default=0.0, help="seconds per message")
    parser.add_argument("--async", dest="use_async", action="store_true", help="the async loop")
    return parser.parse_args(argv)


def consumer_settings(args: argparse.Namespace) -> ConsumerSettings:
    return ConsumerSettings(
        args.name,
        [args.topic],
        args.bootstrap_servers,
        batch_size=args.batch_size,
        backoff_base=0.01,
        backoff_cap=0.1,
        poll_timeout=0.2,
        kafka_config=KAFKA_CONFIG,
    )


class KillAfterCommits:
    """The ``after_commit`` listener: SIGKILL right after the Nth commit."""

    def __init__(self, kill_after: int) -> None:
        self.kill_after = kill_after
        self.commits = 0
        self.last_handled = ""

    def __call__(self, _session: Session) -> None:
        self.commits += 1
        if self.commits == self.kill_after:
            print(f"KILLING after commit {self.commits} of {self.last_handled}", flush=True)
            os.kill(os.getpid(), signal.SIGKILL)


async def main_async(args: argparse.Namespace) -> int:
    from sqlalchemy.ext.asyncio import AsyncSession, async_sessionmaker, create_async_engine

    from outbox.consumer_async import AsyncConsumeLoop

    engine = create_async_engine(urls.to_sqlalchemy(args.database_url))
    async with engine.begin() as conn:
        await conn.exec_driver_sql(EFFECTS_DDL)
    sessions = async_sessionmaker(engine)
    killer = KillAfterCommits(args.kill_after_commits)

    async def handler(session: AsyncSession, message: Message) -> None:
        await asyncio.sleep(args.handler_delay)
        await session.run_sync(record, message)
        killer.last_handled = event_id_or_position(message)

    def session_factory() -> AsyncSession:
        session = sessions()
        event.listen(session.sync_session, "after_commit", killer)
        return session

    loop = AsyncConsumeLoop(consumer_settings(args), handler, session_factory)
    print("STARTED", flush=True)
    try:
        await loop.run()
    finally:
        print("STATS " + json.dumps(vars(loop.stats)), flush=True)
        await engine.dispose()
    return 0


def main(argv: list[str] | None = None) -> int:
    args = parse_args(argv)
    if args.use_async:
        return asyncio.run(main_async(args))
    engine = sa.create_engine(urls.to_sqlalchemy(args.database_url))
    with engine.begin() as conn:
        conn.exec_driver_sql(EFFECTS_DDL)
    sessions = sessionmaker(engine)
    killer = KillAfterCommits(args.kill_after_commits)

    def handler(session: Session, message: Message) -> None:
        time.sleep(args.handler_delay)
        record(session, message)
        killer.last_handled = event_id_or_position(message)

    def session_factory() -> Session:
        session = sessions()
        event.listen(session, "after_commit", killer)
        return session

    loop = ConsumeLoop(consumer_settings(args), handler, session_factory)
    print("STARTED", flush=True)
    try:
        loop.run()
    finally:
        print("STATS " + json.dumps(vars(loop.stats)), flush=True)
        engine.dispose()
    return 0


if __name__ == "__main__":
    sys.exit(main())
