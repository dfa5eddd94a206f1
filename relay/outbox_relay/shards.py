"""Which shards this relay owns: session advisory locks on a connection of their own.

Every relay holds one *membership* lock, so the live relays can be listed from ``pg_locks``
without heartbeats: PostgreSQL drops the locks of a relay whose connection dies. Each relay
computes the same assignment from that list (rendezvous hashing: a shard goes to the member with
the highest hash of (member, shard), so a join or leave moves only the shards it must), releases
the shards it should no longer own, and tries to lock the ones it should. A shard still held by
its previous owner is picked up at a later rebalance, once that owner has let go between batches.

The connection is kept apart from the one doing batch work, so a slow batch never costs the relay
its shards. A claim names the shards this relay holds (:class:`.ports.Ownership`) and checks
inside its own transaction that this session is still alive, through the membership lock: a
session's advisory locks go only with the session or when the relay itself lets go of them, and
shards let go of leave ``owned`` before they are unlocked.
"""

from __future__ import annotations

import hashlib
import secrets
from typing import Any

import psycopg

from outbox.settings import SHARD_COUNT, OutboxSettings
from outbox_relay.config import RelaySettings
from outbox_relay.pg import OWNER_ROLE, relay_connect
from outbox_relay.ports import Ownership

_MEMBERS_SQL = """
SELECT objid::bigint FROM pg_locks
WHERE locktype = 'advisory' AND classid = %s AND objsubid = 2 AND granted
  AND database = (SELECT oid FROM pg_database WHERE datname = current_database())
"""


def lock_class(settings: OutboxSettings, kind: str) -> int:
    """A stable, non-negative int4 naming one kind of advisory lock of one outbox."""
    digest = hashlib.sha256(
        f"outbox-relay:{kind}:{settings.schema}.{settings.table_prefix}".encode()
    )
    return int.from_bytes(digest.digest()[:4], "big") & 0x7FFFFFFF


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

    def __init__(self, settings: RelaySettings) -> None:
        self._settings = settings
        self._shard_class = lock_class(settings.outbox, "shards")
        self._member_class = lock_class(settings.outbox, "members")
        self._conn: psycopg.Connection[Any] | None = None
        self.member_id = 0
        self.owned: frozenset[int] = frozenset()

    @property
    def shard_class(self) -> int:
        return self._shard_class

    @property
    def ownership(self) -> Ownership:
        """What a claim needs to take this relay's rows, and only while this session lives."""
        return Ownership(self.owned, self._member_class, self.member_id)

    @property
    def connection(self) -> psycopg.Connection[Any]:
        if self._conn is None:
            raise RuntimeError("ShardOwner is not connected")
        return self._conn

    def connect(self) -> None:
        """Open the connection and join the members."""
        conn = relay_connect(self._settings, role=OWNER_ROLE, autocommit=True)
        while True:
            member = 1 + secrets.randbelow(2**31 - 1)
            row = conn.execute(
                "SELECT pg_try_advisory_lock(%s, %s)", (self._member_class, member)
            ).fetchone()
            if row and row[0]:
                break
        self._conn, self.member_id, self.owned = conn, member, frozenset()

    def members(self) -> list[int]:
        rows = self.connection.execute(_MEMBERS_SQL, (self._member_class,)).fetchall()
        return sorted(int(r[0]) for r in rows)

    def rebalance(self) -> tuple[frozenset[int], frozenset[int]]:
        """Let go of shards now meant for others, lock free ones meant for us.

        Returns (acquired, released).
        """
        members = self.members()
        if self.member_id not in members:  # our membership lock is gone: the session was reset
            raise psycopg.OperationalError("the relay's ownership session lost its locks")
        desired = assignment(members, self.member_id)
        released = self.owned - desired
        if released:
            # Out of every claim from now on, before another relay can lock them.
            self.owned -= released
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
        self.owned |= acquired
        return acquired, released

    def close(self) -> None:
        """Release every shard and the membership by closing the session."""
        conn, self._conn, self.owned = self._conn, None, frozenset()
        if conn is not None:
            try:
                conn.execute("SELECT pg_advisory_unlock_all()")
            except psycopg.Error:
                pass  # the session is gone, and its locks with it
            finally:
                conn.close()
