"""The relay registry (migration 0006) on a real PostgreSQL: who counts as gone, for how long
its shards wait, and who is let off (a clean leave, a relay that reconnected)."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from outbox.settings import SHARD_COUNT
from outbox_relay.config import RelaySettings
from outbox_relay.shards import LINGER_MARGIN, ShardOwner

DELIVERY_TIMEOUT = 20.0
LINGER = DELIVERY_TIMEOUT + LINGER_MARGIN


@pytest.fixture
def settings(database_url: str) -> RelaySettings:
    return RelaySettings(
        database_url=database_url,
        kafka_bootstrap_servers="unused:9092",
        delivery_timeout=DELIVERY_TIMEOUT,
    )


@pytest.fixture
def owners(settings: RelaySettings) -> Iterator[list[ShardOwner]]:
    made: list[ShardOwner] = []
    yield made
    for owner in made:
        owner.close()


def joined(settings: RelaySettings, owners: list[ShardOwner]) -> ShardOwner:
    owner = ShardOwner(settings)
    owner.connect()
    owner.rebalance()
    owners.append(owner)
    return owner


def registry(database_url: str) -> dict[int, bool]:
    """member -> whether it is marked gone."""
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT member, gone_at IS NOT NULL FROM outbox_relays").fetchall()
    return {int(m): bool(gone) for m, gone in rows}


def terminate(database_url: str, owner: ShardOwner) -> None:
    """The owner's session dies under it (pg_terminate_backend), as in a partition."""
    pid = owner.connection.info.backend_pid
    with psycopg.connect(database_url, autocommit=True) as conn:
        conn.execute("SELECT pg_terminate_backend(%s, 10000)", (pid,))


def test_a_relay_that_leaves_cleanly_holds_nobody_back(
    settings: RelaySettings, owners: list[ShardOwner], database_url: str
) -> None:
    """Its producer was settled, so it deletes its row: the successor claims at once."""
    first = joined(settings, owners)
    assert registry(database_url) == {first.member_id: False}
    first.close(leave=True)
    successor = joined(settings, owners)
    assert successor.owned == frozenset(range(SHARD_COUNT))
    assert successor.ownership.shards == successor.owned
    assert registry(database_url) == {successor.member_id: False}


def test_a_relay_gone_without_leaving_holds_its_shards_back_for_its_linger(
    settings: RelaySettings, owners: list[ShardOwner], database_url: str
) -> None:
    """Its sessions died (it may be alive, delivering its queue): the shards it held wait for
    its delivery timeout plus the margin; the successor's own shards do not."""
    gone = joined(settings, owners)
    successor = joined(settings, owners)
    gone.rebalance()  # lets go of the successor's share
    successor.rebalance()
    own_share = successor.owned
    assert 0 < len(own_share) < SHARD_COUNT
    terminate(database_url, gone)
    successor.rebalance()
    assert registry(database_url) == {gone.member_id: True, successor.member_id: False}
    assert successor.owned == frozenset(range(SHARD_COUNT))
    assert successor.ownership.shards == own_share
    assert LINGER - 5 < successor.handover.waiting() <= LINGER


def test_a_relay_started_after_the_departure_waits_too(
    settings: RelaySettings, owners: list[ShardOwner], database_url: str
) -> None:
    """A relay that never saw the gone one still learns of it from the registry."""
    gone = joined(settings, owners)
    terminate(database_url, gone)
    successor = joined(settings, owners)
    assert successor.owned == frozenset(range(SHARD_COUNT))
    assert successor.ownership.shards == frozenset()


def test_a_relay_that_reconnected_holds_nobody_back(
    settings: RelaySettings, owners: list[ShardOwner], database_url: str
) -> None:
    """The same process registered again: it settled its producer before reconnecting, so
    the shards of its old membership need not wait."""
    relay = joined(settings, owners)
    old_member = relay.member_id
    terminate(database_url, relay)
    relay.close()  # what recovery does once the session is found dead
    relay.connect()
    relay.rebalance()
    successor = joined(settings, owners)
    relay.rebalance()
    successor.rebalance()
    assert registry(database_url)[old_member] is True
    assert successor.owned
    assert successor.ownership.shards == successor.owned
