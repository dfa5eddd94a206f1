"""``outbox-relay status`` reports what the running relays do, read from their registry rows,
not what its own flags say."""

from __future__ import annotations

from collections.abc import Callable, Iterator

import psycopg
import pytest

import outbox
from outbox_relay import status
from outbox_relay.config import RelaySettings
from outbox_relay.loop import Relay
from outbox_relay.retention import partition_span
from outbox_relay.signals import StopSignal
from tests.integration.test_retention import DeliverAll, relay_settings


@pytest.fixture
def relays(database_url: str) -> Iterator[Callable[[float], Relay]]:
    """Relays that publish everything, joined and stepped once; left at the end."""
    started: list[tuple[Relay, StopSignal]] = []

    def start(retention: float) -> Relay:
        settings = relay_settings(database_url, retention=retention)
        stop = StopSignal()
        relay = Relay(settings, DeliverAll(), stop)
        relay.connect()
        started.append((relay, stop))
        relay.step()  # the first rebalance: joins and registers
        return relay

    yield start
    for relay, stop in started:
        relay.leave()
        relay.shutdown()
        stop.close()


def read(database_url: str, *, retention_kept: bool) -> status.Status:
    settings = RelaySettings(database_url=database_url, kafka_bootstrap_servers="unused:9092")
    with psycopg.connect(database_url) as conn:
        return status.read(
            conn, settings.outbox, dead_letters_block=False, retention_kept=retention_kept
        )


def test_status_counts_published_rows_when_the_relays_keep_them(
    database_url: str, relays: Callable[[float], Relay]
) -> None:
    """Relays running with --retention: status (without that flag) counts the published rows
    and shows each relay's retention."""
    relay = relays(3600)
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [outbox.Event("orders", {"n": n}) for n in range(3)])
    relay.step()
    found = read(database_url, retention_kept=False)
    assert found.published_last_minute == 3
    assert [r.retention_seconds for r in found.relays] == [3600]
    assert found.kept_partitions >= 1  # the partition holding them, and those made ahead
    assert found.kept_since_seconds is not None
    assert found.kept_since_seconds <= 2 * partition_span(3600)  # made from one span back
    rendered = status.render(found)
    assert "1:00:00" in rendered
    assert "published events kept" in rendered


def test_status_says_rows_are_deleted_when_the_relays_delete_them(
    database_url: str, relays: Callable[[float], Relay]
) -> None:
    """Relays deleting on publish: status says so, even when given --retention itself."""
    relays(0)
    found = read(database_url, retention_kept=True)
    assert found.published_last_minute is None
    assert [r.retention_seconds for r in found.relays] == [0]
    assert "the relays delete rows on publish" in status.render(found)


def test_with_no_relay_running_status_goes_by_its_own_flag(database_url: str) -> None:
    assert read(database_url, retention_kept=True).published_last_minute == 0
    assert read(database_url, retention_kept=False).published_last_minute is None
