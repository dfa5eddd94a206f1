"""Helpers for the fleet's acceptance tests: outbox databases made and dropped on the suite's
server, the ``--outboxes`` list file, fleet relays as subprocesses, their sessions and logs, and
a writer that keeps adding events to several outboxes at once."""

from __future__ import annotations

import contextlib
import os
import signal
import subprocess
import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import psycopg

import outbox
from outbox import testing
from outbox_relay.pg import APPLICATION_NAME
from tests.acceptance.relay_harness import (
    Received,
    per_key_order_violations,
    relay_args,
    stop,
)

#: How ``pg_stat_activity`` names a relay's sessions: ``outbox-relay <role> <relay id>``.
RELAY_SESSIONS = f"{APPLICATION_NAME} %"


@dataclass(frozen=True)
class OutboxDb:
    """An outbox of the list: its name there, its database and that database's URL."""

    name: str
    database: str
    url: str


class Databases:
    """Databases of one test on the suite's server, each dropped (WITH FORCE) at ``close``."""

    def __init__(self, server_url: str, template: str) -> None:
        self.server_url = server_url
        self.template = template
        self._made: list[str] = []

    def create(self, name: str, *, schema: bool = True) -> OutboxDb:
        """A new database for outbox ``name``: a copy of the suite's template (the outbox
        schema applied), or with ``schema=False`` an empty one."""
        database = testing.unique_name(f"fleet_{name}")
        self._made.append(database)
        template = self.template if schema else "template0"
        return OutboxDb(
            name, database, testing.create_database(self.server_url, database, template=template)
        )

    def drop(self, db: OutboxDb) -> None:
        """Drop ``db`` now, disconnecting whoever is connected (the relays too)."""
        testing.drop_database(self.server_url, db.database)

    def close(self) -> None:
        for database in self._made:
            testing.drop_database(self.server_url, database)


def write_list(path: Path, outboxes: Sequence[OutboxDb], *, relays: int = 1) -> Path:
    """Write the ``--outboxes`` list naming ``outboxes`` at once: to a file beside it, then
    renamed over it, so a relay reading it never sees half of it."""
    tables = [
        f'[[outbox]]\nname = "{db.name}"\ndatabase_url = "{db.url}"\nrelays = {relays}\n'
        for db in outboxes
    ]
    partial = path.with_name(path.name + ".new")
    partial.write_text("\n".join(tables))
    os.replace(partial, path)
    return path


def fleet_args(list_file: Path, bootstrap: str, *extra: str) -> list[str]:
    """The command line of a relay serving the outboxes of ``list_file``, with the short
    timeouts of :func:`relay_args`."""
    args = relay_args(str(list_file), bootstrap, *extra)
    args[args.index("--database-url")] = "--outboxes"
    return args


class Relays:
    """Fleet relays started as subprocesses, each logging JSON lines to a file of its own;
    ``close`` stops (or kills) those still running."""

    def __init__(self, log_dir: Path) -> None:
        self.log_dir = log_dir
        self.procs: list[subprocess.Popen[bytes]] = []

    def start(self, args: Sequence[str], log: str) -> tuple[subprocess.Popen[bytes], Path]:
        path = self.log_dir / f"{log}.log"
        with open(path, "ab") as out:  # the child has its own copy
            proc = subprocess.Popen(list(args), stdout=out, stderr=subprocess.STDOUT)
        self.procs.append(proc)
        return proc, path

    def close(self) -> None:
        for proc in self.procs:
            if proc.poll() is None:
                with contextlib.suppress(subprocess.TimeoutExpired):
                    stop(proc, signal.SIGTERM, timeout=20)
            if proc.poll() is None:
                proc.kill()
                proc.wait()


def log_lines(
    path: Path, event: str | None = None, *, outbox: str | None = None
) -> list[dict[str, Any]]:
    """The JSON log lines of a relay, optionally of one event and one outbox only."""
    lines = testing.log_events(path.read_text(), event) if path.exists() else []
    return [line for line in lines if outbox is None or line.get("outbox") == outbox]


def served(path: Path) -> set[str]:
    """The outboxes the relay logging to ``path`` serves now, by its ``fleet.outbox_taken``
    and ``fleet.outbox_released`` lines."""
    now: set[str] = set()
    for line in log_lines(path):
        if line.get("event") == "fleet.outbox_taken":
            now.add(line["outbox"])
        elif line.get("event") == "fleet.outbox_released":
            now.discard(line["outbox"])
    return now


def relay_sessions(server_url: str) -> dict[str, list[str]]:
    """Database name -> the ``application_name`` of every relay session connected to it."""
    with psycopg.connect(server_url, autocommit=True) as conn:
        rows = conn.execute(
            "SELECT datname, application_name FROM pg_stat_activity"
            " WHERE application_name LIKE %s AND datname IS NOT NULL",
            (RELAY_SESSIONS,),
        ).fetchall()
    found: dict[str, list[str]] = {}
    for database, name in rows:
        found.setdefault(str(database), []).append(str(name))
    return found


def unpublished_ids(database_url: str) -> set[str]:
    """Event ids of the rows neither published nor dead-lettered."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute(
            "SELECT event_id FROM outbox_events"
            " WHERE published_at IS NULL AND dead_lettered_at IS NULL"
        ).fetchall()
    return {str(row[0]) for row in rows}


def assert_delivered(received: Sequence[Received], ids: Sequence[str]) -> None:
    """Every id in ``ids`` arrived, nothing else did, each key's events first arrived in the
    order written (copies allowed)."""
    seen = {r.event_id for r in received}
    missing = set(ids) - seen
    assert not missing, (
        f"{len(missing)} of {len(ids)} events never arrived, e.g. {sorted(missing)[:3]}"
    )
    assert seen <= set(ids), f"{len(seen - set(ids))} messages that were not written here"
    assert per_key_order_violations(received, ids) == []


@dataclass
class ContinuousWriter:
    """A thread adding ``batch`` events every ``pause`` seconds to each outbox, over ``keys``
    keys, until ``stop``; ``ids[url]`` lists each outbox's event ids in commit order."""

    outboxes: Sequence[tuple[str, str]]  # (database URL, topic)
    batch: int = 10
    keys: int = 8
    pause: float = 0.05
    ids: dict[str, list[str]] = field(default_factory=dict)
    error: BaseException | None = None

    def __post_init__(self) -> None:
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)
        self.ids = {url: [] for url, _ in self.outboxes}

    def start(self) -> ContinuousWriter:
        self._thread.start()
        return self

    def written(self) -> int:
        return sum(len(ids) for ids in self.ids.values())

    def stop(self) -> None:
        self._stop.set()
        self._thread.join(timeout=30)
        if self.error is not None:
            raise AssertionError(f"the writer failed: {self.error!r}") from self.error

    def _run(self) -> None:
        try:
            with contextlib.ExitStack() as stack:
                conns = [
                    (stack.enter_context(psycopg.connect(url)), url, topic)
                    for url, topic in self.outboxes
                ]
                n = 0
                while not self._stop.is_set():
                    for conn, url, topic in conns:
                        events = [
                            outbox.Event(topic, {"n": n + i}, key=f"key-{(n + i) % self.keys}")
                            for i in range(self.batch)
                        ]
                        with conn.transaction():
                            written = outbox.add_many(conn, events)
                        self.ids[url].extend(str(i) for i in written)
                    n += self.batch
                    self._stop.wait(self.pause)
        except BaseException as exc:  # reported by stop()
            self.error = exc
