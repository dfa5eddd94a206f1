"""Reconnecting (outbox_relay/recovery.py): until it works, or until a stop."""

from __future__ import annotations

from collections.abc import Iterator

import psycopg
import pytest

from outbox_relay.recovery import reconnect
from outbox_relay.signals import StopSignal


@pytest.fixture
def stop() -> Iterator[StopSignal]:
    signal = StopSignal()
    yield signal
    signal.close()


def test_failed_attempts_are_cleaned_up_and_retried_until_one_works(stop: StopSignal) -> None:
    calls: list[str] = []

    def connect() -> None:
        calls.append("connect")
        if calls.count("connect") < 3:
            raise psycopg.OperationalError("connection refused")

    waits: list[float] = []
    assert reconnect(
        connect, lambda: calls.append("close"), stop=stop, sleep=waits.append, alive=lambda: None
    )
    assert calls == ["connect", "close", "connect", "close", "connect"]
    assert len(waits) == 3
    assert all(0 <= w <= 30 for w in waits)


def test_a_stop_ends_the_attempts(stop: StopSignal) -> None:
    def connect() -> None:
        stop.request("test")
        raise psycopg.OperationalError("connection refused")

    assert not reconnect(
        connect, lambda: None, stop=stop, sleep=lambda _s: None, alive=lambda: None
    )
