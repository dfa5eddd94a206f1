"""Many outboxes, one fleet of relays: which relay serves which outbox.

The relays of a fleet find each other in one database, the *fleet database*
(``--fleet-database-url``, by default the database of the first outbox listed at start): each
holds a session advisory lock there under a random member id, so the live relays are listed from
``pg_locks``, with no table and no heartbeat, and a dead relay drops out with its session. Every
relay computes the same assignment from that list (rendezvous hashing, as for shards): an outbox
goes to the ``relays`` members with the highest hash of (member, outbox name), so a relay joining
or leaving moves only the outboxes it must. A relay connects only to the outboxes it is given.

Correctness never rests on the assignment. Two relays serving one outbox (while their views of
the members differ for a moment) share its shards through the outbox's own locks, as the relays
of one outbox always have (:mod:`.shards`). A relay no longer given an outbox leaves it as a
stopping relay does (its producer settled first), and the relay now given it takes its shards at
its next rebalance. If the fleet database is unreachable, every relay keeps serving what it
served, and tries again with a growing backoff.
"""

from __future__ import annotations

import dataclasses
import hashlib
import select
import time
from collections.abc import Callable, Mapping, Sequence
from typing import Any

import psycopg
import structlog

from outbox.errors import ConfigurationError, one_line
from outbox_relay.backoff import full_jitter
from outbox_relay.config import RelaySettings
from outbox_relay.loop import served_metrics
from outbox_relay.outboxes import OutboxEntry, OutboxFile
from outbox_relay.pg import DatabaseUnavailableError, relay_connect
from outbox_relay.ports import Metrics, NoMetrics, Publisher
from outbox_relay.shards import take_member_id
from outbox_relay.signals import StopSignal
from outbox_relay.worker import OutboxWorker

log = structlog.get_logger("relay.fleet")

#: The advisory lock class of fleet membership (objid: the member id).
FLEET_LOCK_CLASS = (
    int.from_bytes(hashlib.sha256(b"outbox-relay:fleet").digest()[:4], "big") & 0x7FFFFFFF
)
#: The role of a relay's session in the fleet database (``pg_stat_activity``).
FLEET_ROLE = "fleet"
#: Backoff of the fleet database's reconnection: random(0, min(CAP, BASE * 2**attempt)) s.
RECONNECT_BASE, RECONNECT_CAP = 1.0, 60.0

_MEMBERS_SQL = """
SELECT objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def assignment(spread: Mapping[str, int], members: Sequence[int], member: int) -> frozenset[str]:
    """The outboxes rendezvous hashing gives to ``member`` (pure): each outbox goes to the
    ``spread[name]`` members with the highest hash of (member, name)."""

    def weight(m: int, name: str) -> tuple[int, int]:
        digest = hashlib.blake2b(f"{m}:{name}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big"), m

    given = set()
    for name, relays in spread.items():
        ranked = sorted(members, key=lambda m: weight(m, name), reverse=True)
        if member in ranked[:relays]:
            given.add(name)
    return frozenset(given)


class FleetMembership:
    """This relay's membership lock in the fleet database, on an autocommit connection."""

    def __init__(self, settings: RelaySettings, database_url: str) -> None:
        self._settings = dataclasses.replace(settings, database_url=database_url)
        self._conn: psycopg.Connection[Any] | None = None
        self.member_id = 0

    def members(self) -> list[int]:
        """The live members, this relay among them (joining first if it is not)."""
        if self._conn is None or self._conn.closed:
            self._conn = relay_connect(self._settings, role=FLEET_ROLE, autocommit=True)
            self.member_id = 0
        if not self.member_id:
            self.member_id = take_member_id(self._conn, FLEET_LOCK_CLASS)
        rows = self._conn.execute(_MEMBERS_SQL, (FLEET_LOCK_CLASS,)).fetchall()
        found = sorted(int(r[0]) for r in rows)
        if self.member_id not in found:  # the session was reset: join again at the next pass
            self.close()
            raise psycopg.OperationalError("the relay's fleet session lost its membership lock")
        return found

    def close(self) -> None:
        conn, self._conn, self.member_id = self._conn, None, 0
        if conn is not None:
            conn.close()


class Fleet:
    """Serves the outboxes this relay is given, each by an :class:`OutboxWorker`, until stopped."""

    def __init__(
        self,
        settings: RelaySettings,
        outboxes: Callable[[], tuple[OutboxEntry, ...] | None],
        fleet_database_url: str,
        stop: StopSignal,
        *,
        metrics_for: Callable[[str], Metrics],
        forget_metrics: Callable[[str], None],
        new_publisher: Callable[[RelaySettings], Publisher],
        listed: Callable[[list[str]], None] = lambda _names: None,
        alive: Callable[[], None] = lambda: None,
    ) -> None:
        self.settings = settings
        #: The outboxes now, or None when they have not changed since the last call.
        self._outboxes = outboxes
        self.membership = FleetMembership(settings, fleet_database_url)
        self.stop = stop
        self._metrics_for = metrics_for
        self._forget_metrics = forget_metrics
        self._new_publisher = new_publisher
        self._listed = listed
        self._alive = alive
        self.entries: dict[str, OutboxEntry] = {}
        self._loaded = False
        #: Why the list could not be read last time ("" when it could).
        self._list_error = ""
        self.workers: dict[str, OutboxWorker] = {}
        #: Workers asked to stop, until their thread ends.
        self._leaving: dict[str, OutboxWorker] = {}
        self._members: list[int] = []
        self._fleet_failures = 0
        self._next_fleet_try = 0.0
        self.published = 0

    def run(self) -> None:
        """Serve until a stop is requested, or every outbox is drained (--exit-when-idle)."""
        self._reload()
        self.membership.members()  # raises at start when the fleet database is unreachable
        log.info("fleet.joined", member=self.membership.member_id, outboxes=len(self.entries))
        while not self.stop.requested:
            self._pass(time.monotonic())
            self._alive()
            if self.settings.exit_when_idle and self._drained():
                self.stop.request("idle")
                break
            select.select([self.stop.fd], [], [], self.settings.rebalance_interval)
        self._stop_all(self.stop.reason or "stop")
        self.membership.close()
        log.info("fleet.stopped", reason=self.stop.reason, published=self.published)

    def _pass(self, now: float) -> None:
        self._reload()
        members = self._read_members(now)
        if members is not None:
            self._members = members
        spread = {name: entry.relays for name, entry in self.entries.items()}
        if self.membership.member_id:
            given = assignment(spread, self._members, self.membership.member_id)
        else:  # no fleet session (its database is unreachable): keep what is served and listed
            given = frozenset(self.workers) & frozenset(self.entries)
        if not self.settings.exit_when_idle:  # a worker that ended on its own is started again
            for name in [name for name, worker in self.workers.items() if worker.done]:
                self._leaving[name] = self.workers.pop(name)
        self._reap()
        for name in sorted(set(self.workers) - given):
            reason = "removed from the list" if name not in self.entries else "given to another"
            self._let_go(name, reason)
        for name in sorted(given - set(self.workers)):
            if name not in self._leaving:  # still leaving: served again at a later pass
                self._serve(self.entries[name])

    def _reload(self) -> None:
        try:
            changed = self._outboxes()
        except ConfigurationError as exc:
            if not self._loaded:
                raise  # at start: the command's error
            if str(exc) != self._list_error:  # once per error, not once per pass
                log.error(
                    "fleet.outboxes_invalid",
                    error=str(exc),
                    effect="the relay keeps serving the outboxes of the list as it last read it",
                )
            self._list_error = str(exc)
            return
        if changed is None:
            return
        self._list_error = ""
        before, self._loaded = self.entries, True
        self.entries = {entry.name: entry for entry in changed}
        self._listed(list(self.entries))
        for name, entry in self.entries.items():
            if name in self.workers and before.get(name) != entry:
                self._let_go(name, "changed in the list")  # served anew at the next pass
        if before:
            log.info(
                "fleet.outboxes_reloaded",
                outboxes=len(self.entries),
                added=sorted(set(self.entries) - set(before)),
                removed=sorted(set(before) - set(self.entries)),
            )

    def _read_members(self, now: float) -> list[int] | None:
        """The live members; None (and the last list stands) while the fleet database fails."""
        if now < self._next_fleet_try:
            return None
        try:
            members = self.membership.members()
        except (psycopg.Error, DatabaseUnavailableError) as exc:
            self.membership.close()
            if not self._fleet_failures:
                log.error(
                    "fleet.database_unavailable",
                    error=one_line(exc),
                    effect="the relay keeps serving its outboxes; none is handed over",
                )
            self._next_fleet_try = now + full_jitter(
                self._fleet_failures, base=RECONNECT_BASE, cap=RECONNECT_CAP
            )
            self._fleet_failures += 1
            return None
        if self._fleet_failures:
            log.info("fleet.database_reconnected", attempts=self._fleet_failures)
            self._fleet_failures = 0
        if members != self._members:
            log.info("fleet.members_changed", members=len(members))
        return members

    def _serve(self, entry: OutboxEntry) -> None:
        worker = OutboxWorker(
            entry, self.settings, self._metrics_for(entry.name), self._new_publisher
        )
        self.workers[entry.name] = worker
        log.info("fleet.outbox_taken", outbox=entry.name)
        worker.start()

    def _let_go(self, name: str, reason: str) -> None:
        worker = self.workers.pop(name)
        log.info("fleet.outbox_released", outbox=name, reason=reason)
        worker.request_stop(reason)
        self._leaving[name] = worker

    def _reap(self) -> None:
        """Forget the workers whose thread ended (left, or drained with --exit-when-idle)."""
        for name, worker in list(self._leaving.items()):
            if worker.done:
                del self._leaving[name]
                worker.close()
                self.published += worker.published
                if name not in self.workers:
                    self._forget_metrics(name)

    def _drained(self) -> bool:
        """Every outbox this relay serves has stopped on its own (``--exit-when-idle``)."""
        if not self.workers or not all(w.done for w in self.workers.values()):
            return False
        for name in list(self.workers):
            self._leaving[name] = self.workers.pop(name)
        self._reap()
        return True

    def _stop_all(self, reason: str) -> None:
        for name in list(self.workers):
            self._leaving[name] = self.workers.pop(name)
        for worker in self._leaving.values():
            worker.request_stop(reason)
        deadline = time.monotonic() + self.settings.grace_period + self.settings.delivery_timeout
        for worker in self._leaving.values():
            worker.join(max(0.0, deadline - time.monotonic()))
        self._reap()


def entries_changed(
    read: Callable[[], tuple[OutboxEntry, ...]], file: OutboxFile | None
) -> Callable[[], tuple[OutboxEntry, ...] | None]:
    """What :class:`Fleet` asks for the outboxes: the list when it changed (always the first
    time), else None. Without a file, the list of ``--database-url`` never changes."""
    first = True

    def outboxes() -> tuple[OutboxEntry, ...] | None:
        nonlocal first
        if first or (file is not None and file.changed()):
            first = False
            return read()
        return None

    return outboxes


def serve_fleet(
    settings: RelaySettings,
    outboxes: Callable[[], tuple[OutboxEntry, ...] | None],
    fleet_database_url: str,
    *,
    new_publisher: Callable[[RelaySettings], Publisher],
    check_broker: Callable[[], None],
    probe_broker: Callable[[float], None] | None = None,
) -> None:
    """Serve the outboxes this relay is given among the fleet's relays until stopped.

    Raises (before serving) when the list is wrong, the fleet database is unreachable or the
    broker does not answer; an outbox's own failures never end the command (:mod:`.worker`).
    """
    stop = StopSignal()
    stop.install()
    try:
        with served_metrics(settings, probe_broker, isolated=True) as metrics:
            check_broker()
            fleet = Fleet(
                settings,
                outboxes,
                fleet_database_url,
                stop,
                metrics_for=metrics.for_outbox if metrics is not None else _no_metrics,
                forget_metrics=metrics.forget_outbox if metrics is not None else _forget_none,
                new_publisher=new_publisher,
                listed=metrics.set_listed if metrics is not None else _names_none,
                alive=metrics.beat if metrics is not None else _nothing,
            )
            fleet.run()
    finally:
        stop.restore()
        stop.close()


def _no_metrics(_name: str) -> Metrics:
    return NoMetrics()


def _forget_none(_name: str) -> None:
    pass


def _names_none(_names: list[str]) -> None:
    pass


def _nothing() -> None:
    pass
