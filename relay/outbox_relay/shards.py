"""Which shards this relay owns: session advisory locks on a connection of their own.

Every relay holds one *membership* lock and registers in the ``relays`` table, so the live
relays are listed without heartbeats: the registered ones whose lock is held (PostgreSQL drops
the locks of a relay whose connection dies; each lock is tried, not read from ``pg_locks``,
which costs every lock of the server). Each relay computes the same assignment from that list
(rendezvous hashing: a shard goes to the member with the highest hash of (member, shard), so a
join or leave moves only the shards it must), releases
the shards it should no longer own, and tries to lock the ones it should. A shard still held by
its previous owner is picked up at a later rebalance, once that owner has let go between batches.

The connection is kept apart from the one doing batch work, so a slow batch never costs the relay
its shards. A claim names the shards this relay holds (:class:`.ports.Ownership`) and checks
inside its own transaction that this session is still alive, through the membership lock: a
session's advisory locks go only with the session or when the relay itself lets go of them, and
shards let go of leave ``owned`` before they are unlocked.

Each relay also registers in the ``relays`` table (migration 0006). A relay whose membership lock
is gone while its row stays (it did not leave cleanly) may still be alive and delivering; shards
taken over meanwhile wait until it cannot deliver any more (:mod:`.handover`).
"""

from __future__ import annotations

import hashlib
import secrets
import time
from collections.abc import Callable
from typing import Any

import psycopg

from outbox.settings import SHARD_COUNT, OutboxSettings
from outbox_relay.config import RelaySettings
from outbox_relay.handover import Handover
from outbox_relay.pg import OWNER_ROLE, relay_connect
from outbox_relay.ports import Ownership

#: How long after a relay's sessions end its messages may still reach Kafka, beyond its
#: delivery timeout: the publisher's own margin for librdkafka's reports (``kafka.py``).
LINGER_MARGIN = 5.0

# The live members: the registered relays whose membership lock is held. Each one's lock is
# tried in shared mode for the length of the statement, which fails only while its holder's
# session lives; this relay's own lock would not stop it, so its own row counts as live. A lock
# try per registered relay: reading pg_locks instead costs every lock of the server (256 per
# outbox served), 5 ms a read with 50 outboxes on one server.
_MEMBERS_SQL = """
SELECT member FROM {relays}
WHERE gone_at IS NULL
  AND (member = %(me)s OR NOT pg_try_advisory_xact_lock_shared(%(class)s, member::int))
"""

# Whether this session still holds its membership lock (read now and then: it reads pg_locks).
_OWN_LOCK_SQL = """
SELECT EXISTS (SELECT 1 FROM pg_locks
               WHERE locktype = 'advisory' AND pid = pg_backend_pid() AND granted
                 AND classid = %s AND objid = %s AND objsubid = 2)
"""

_REGISTER_SQL = """
INSERT INTO {relays} (member, relay_id, process, linger, retention)
VALUES (%s, %s, %s, make_interval(secs => %s), make_interval(secs => %s))
ON CONFLICT (member) DO NOTHING
"""

# Marks the relays whose membership lock is gone, and forgets those gone long ago. Each lock is
# tried in the same statement: a row this statement sees was inserted after its relay took its
# lock, so a live relay is never marked.
_MARK_GONE_SQL = """
WITH swept AS (
    DELETE FROM {relays} WHERE gone_at < now() - linger - interval '10 minutes'
)
UPDATE {relays} SET gone_at = now()
WHERE gone_at IS NULL AND member <> %(me)s
  AND pg_try_advisory_xact_lock_shared(%(class)s, member::int)
"""

#: Rebalances between two checks that this session still holds its membership lock.
OWN_LOCK_CHECK_EVERY = 30

# Seconds until no relay that went without leaving cleanly can deliver any more. A process
# still registered under another member reconnected, and emptied its producer first.
_LINGERING_SQL = """
SELECT coalesce(max(extract(epoch FROM gone.gone_at + gone.linger - now())), 0)::float8
FROM {relays} AS gone
WHERE gone.gone_at + gone.linger > now()
  AND NOT EXISTS (
      SELECT 1 FROM {relays} AS back WHERE back.process = gone.process AND back.gone_at IS NULL
  )
"""


def lock_class(settings: OutboxSettings, kind: str) -> int:
    """A stable, non-negative int4 naming one kind of advisory lock of one outbox."""
    digest = hashlib.sha256(
        f"outbox-relay:{kind}:{settings.schema}.{settings.table_prefix}".encode()
    )
    return int.from_bytes(digest.digest()[:4], "big") & 0x7FFFFFFF


def take_member_id(conn: psycopg.Connection[Any], lock_class: int) -> int:
    """A free random member id, held from now on by a session advisory lock of ``conn``."""
    while True:
        member = 1 + secrets.randbelow(2**31 - 1)
        row = conn.execute("SELECT pg_try_advisory_lock(%s, %s)", (lock_class, member)).fetchone()
        if row and row[0]:
            return member


def assignment(members: list[int], member: int) -> frozenset[int]:
    """The shards rendezvous hashing gives to ``member`` among ``members`` (pure)."""

    def weight(m: int, shard: int) -> int:
        # A cryptographic hash, not CRC-32: CRC is linear, so for same-length inputs the
        # comparison between two members is nearly the same for every shard, and one member
        # could end up with a third of its share while another got twice its share.
        digest = hashlib.blake2b(f"{m}:{shard}".encode(), digest_size=8).digest()
        return int.from_bytes(digest, "big")

    def winner(shard: int) -> int:
        return max(members, key=lambda m: (weight(m, shard), m))

    return frozenset(s for s in range(SHARD_COUNT) if winner(s) == member)


class ShardOwner:
    """Owns shards on an autocommit connection of its own (which also waits for new events,
    ``outbox_relay.wakeup``)."""

    def __init__(
        self, settings: RelaySettings, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self._settings = settings
        self._shard_class = lock_class(settings.outbox, "shards")
        self._member_class = lock_class(settings.outbox, "members")
        self._conn: psycopg.Connection[Any] | None = None
        self.member_id = 0
        self.owned: frozenset[int] = frozenset()
        #: Whether this membership is in the ``relays`` table yet (at the first rebalance, so
        #: that a relay started on an old schema gets the schema check's message, not an error).
        self._registered = False
        self._rebalances = 0
        #: Names this process in the registry; kept across reconnections.
        self._process = secrets.token_hex(8)
        self._linger = settings.delivery_timeout + LINGER_MARGIN
        self._sql = {
            name: settings.outbox.sql(text, relays="relays")
            for name, text in (
                ("register", _REGISTER_SQL),
                ("members", _MEMBERS_SQL),
                ("mark_gone", _MARK_GONE_SQL),
                ("lingering", _LINGERING_SQL),
                ("leave", "DELETE FROM {relays} WHERE member = %s"),
            )
        }
        self.handover = Handover(clock)

    @property
    def shard_class(self) -> int:
        return self._shard_class

    @property
    def ownership(self) -> Ownership:
        """What a claim needs to take this relay's rows, and only while this session lives:
        the shards it holds, less those still waiting for a gone relay's messages."""
        return Ownership(self.handover.claimable(self.owned), self._member_class, self.member_id)

    @property
    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("ShardOwner is not connected")
        return self._conn

    def connect(self) -> None:
        """Open the connection. The relay joins the members at its first rebalance, so that a
        relay failing its start-up checks (schema, broker) never counts as one: the others
        would let shards go to it."""
        conn = relay_connect(self._settings, role=OWNER_ROLE, autocommit=True)
        self._conn, self.member_id, self.owned = conn, 0, frozenset()
        self._registered = False

    def join(self) -> None:
        """Become a member: a membership lock under a free random id (the first rebalance does
        it; once per connection)."""
        if not self.member_id:
            self.member_id = take_member_id(self.connection, self._member_class)

    def members(self) -> list[int]:
        """The live members (registered, their lock held), this relay among them while it is
        registered and not marked gone."""
        params = {"me": self.member_id, "class": self._member_class}
        rows = self.connection.execute(self._sql["members"], params).fetchall()
        return sorted(int(r[0]) for r in rows)

    def _holds_own_lock(self) -> bool:
        row = self.connection.execute(
            _OWN_LOCK_SQL, (self._member_class, self.member_id)
        ).fetchone()
        return bool(row and row[0])

    def rebalance(self) -> tuple[frozenset[int], frozenset[int]]:
        """Let go of shards now meant for others, lock free ones meant for us.

        Returns (acquired, released).
        """
        self.join()
        self._register()
        members = self.members()
        self._rebalances += 1
        # Marked gone by another relay (our lock was free), or, checked now and then, the lock
        # is gone from this session: it was reset.
        if self.member_id not in members or (
            self._rebalances % OWN_LOCK_CHECK_EVERY == 0 and not self._holds_own_lock()
        ):
            raise psycopg.OperationalError("the relay's ownership session lost its locks")
        lingering = self._registry()
        desired = assignment(members, self.member_id)
        released = self.owned - desired
        if released:
            # Out of every claim from now on, before another relay can lock them.
            self.owned -= released
            self.handover.released(released)
            self.connection.execute(
                "SELECT pg_advisory_unlock(%s, s) FROM unnest(%s::int[]) AS s",
                (self._shard_class, sorted(released)),
            )
        wanted = sorted(desired - self.owned)
        acquired: frozenset[int] = frozenset()
        if wanted:
            rows = self.connection.execute(
                "SELECT s FROM unnest(%s::int[]) AS s WHERE pg_try_advisory_lock(%s, s)",
                (wanted, self._shard_class),
            ).fetchall()
            acquired = frozenset(int(r[0]) for r in rows)
            # A shard's previous owner let go of it or is gone; if gone uncleanly, it may
            # still deliver the rows it held until its linger ends.
            self.handover.acquired(acquired, lingering)
        self.owned |= acquired
        return acquired, released

    def _register(self) -> None:
        """Register this relay (once per connection): the members are read from the registry."""
        if not self._registered:
            relay_id = self._settings.relay_id
            self.connection.execute(
                self._sql["register"],
                (self.member_id, relay_id, self._process, self._linger, self._settings.retention),
            )
            self._registered = True

    def _registry(self) -> float:
        """Mark the relays whose lock is gone, and return the seconds until none of those may
        still deliver."""
        conn = self.connection
        conn.execute(self._sql["mark_gone"], {"me": self.member_id, "class": self._member_class})
        row = conn.execute(self._sql["lingering"]).fetchone()
        return float(row[0]) if row else 0.0

    def close(self, *, leave: bool = False) -> None:
        """Release every shard and the membership by closing the session. ``leave``: the
        relay's producer holds nothing, so it leaves the registry too (no successor waits)."""
        conn, self._conn, self.owned = self._conn, None, frozenset()
        self.handover.released(range(SHARD_COUNT))
        if conn is not None:
            try:
                if leave and self._registered:
                    conn.execute(self._sql["leave"], (self.member_id,))
                conn.execute("SELECT pg_advisory_unlock_all()")
            except psycopg.Error:
                pass  # the session is gone, and its locks with it
            finally:
                conn.close()
