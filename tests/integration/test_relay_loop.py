"""The relay loop on a real PostgreSQL with a scripted publisher: what the prefetch may send.

The loop claims the next batch while the current one is published. These tests pin what that
must never change: a key's rows are sent in order, a row behind an undelivered row of its key is
held back (even when it was claimed before that failure was recorded), and what is marked
published is exactly what was delivered. The publisher here is a script (which rows fail), not
Kafka: the guarantee under test is the loop's own bookkeeping; Kafka is in the acceptance tests.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator, Sequence

import psycopg
import pytest

import outbox
from outbox_relay.config import RelaySettings
from outbox_relay.loop import Relay
from outbox_relay.ports import ClaimedRow, Outcome, Result
from outbox_relay.signals import StopSignal


class ScriptedPublisher:
    """Delivers every row but those whose payload is listed in ``fail`` (each fails once)."""

    def __init__(self, fail: set[bytes], result: Result = Result.RETRY) -> None:
        self.fail = set(fail)
        self.result = result
        self.batches: list[list[bytes]] = []

    def publish(
        self, rows: Sequence[ClaimedRow], *, should_abort: Callable[[], bool]
    ) -> list[Outcome]:
        self.batches.append([row.payload for row in rows])
        outcomes = []
        for row in rows:
            if row.payload in self.fail:
                self.fail.discard(row.payload)
                outcomes.append(Outcome(row.id, self.result, "scripted failure"))
            else:
                outcomes.append(Outcome(row.id, Result.DELIVERED))
        return outcomes

    def settle(self, timeout: float) -> bool:
        return True  # every batch was answered before publish returned

    @property
    def sent(self) -> list[bytes]:
        return [payload for batch in self.batches for payload in batch]


@pytest.fixture
def stop() -> Iterator[StopSignal]:
    signal = StopSignal()
    yield signal
    signal.close()


def write(database_url: str, rows: list[tuple[str, str]]) -> None:
    """(key, name) pairs in order; the payload is the name."""
    with psycopg.connect(database_url) as conn:
        outbox.add_many(conn, [outbox.Event("orders", name.encode(), key=k) for k, name in rows])


def unpublished(database_url: str) -> list[bytes]:
    with psycopg.connect(database_url) as conn:
        rows = conn.execute("SELECT payload FROM outbox_events ORDER BY id").fetchall()
    return [bytes(r[0]) for r in rows]


def relay_for(
    database_url: str, publisher: ScriptedPublisher, stop: StopSignal, **overrides: object
) -> Relay:
    options: dict[str, object] = {
        "batch_size": 2,
        "backoff_base": 3600,  # a failed row waits for its retry for the rest of the test
        "backoff_cap": 3600,
        "exit_when_idle": True,
        "poll_interval": 0.05,
        **overrides,
    }
    settings = RelaySettings(
        database_url=database_url,
        kafka_bootstrap_servers="unused:9092",
        **options,  # type: ignore[arg-type]
    )
    relay = Relay(settings, publisher, stop)
    relay.connect()
    return relay


def drain(relay: Relay, steps: int = 20) -> None:
    try:
        for _ in range(steps):
            if relay.stop.requested:
                break
            relay.step()
    finally:
        relay.leave()
        relay.shutdown()


@pytest.mark.parametrize("prefetch", [True, False])
def test_a_row_behind_a_failed_row_of_its_key_is_never_sent_ahead_of_it(
    database_url: str, stop: StopSignal, prefetch: bool
) -> None:
    """a1 fails in the first batch; a2 (in the second batch, claimed while the first was being
    published) is held back, and so is a3; key b flows in order; only delivered rows are gone."""
    write(
        database_url, [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2"), ("a", "a3"), ("b", "b3")]
    )
    publisher = ScriptedPublisher(fail={b"a1"})
    drain(relay_for(database_url, publisher, stop, prefetch=prefetch))
    assert publisher.batches[0] == [b"a1", b"b1"]
    assert [p for p in publisher.sent if p.startswith(b"a")] == [b"a1"]
    assert [p for p in publisher.sent if p.startswith(b"b")] == [b"b1", b"b2", b"b3"]
    assert unpublished(database_url) == [b"a1", b"a2", b"a3"]


def test_a_broker_failure_holds_back_the_key_in_the_prefetched_batch(
    database_url: str, stop: StopSignal
) -> None:
    """A broker failure counts no attempt, so a1 is due again at once: it is sent before a2."""
    write(database_url, [("a", "a1"), ("b", "b1"), ("a", "a2"), ("b", "b2")])
    publisher = ScriptedPublisher(fail={b"a1"}, result=Result.BROKER)
    drain(relay_for(database_url, publisher, stop))
    sent_a = [p for p in publisher.sent if p.startswith(b"a")]
    assert sent_a[:2] == [b"a1", b"a1"]  # failed, then sent again before anything else of a
    assert sent_a[-1] == b"a2"
    assert unpublished(database_url) == []


def test_prefetching_drains_everything_once_in_order(database_url: str, stop: StopSignal) -> None:
    """Without failures every row is sent exactly once, in id order, and deleted."""
    names = [(f"k{i % 3}", f"e{i:02}") for i in range(25)]
    write(database_url, names)
    publisher = ScriptedPublisher(fail=set())
    drain(relay_for(database_url, publisher, stop, batch_size=4), steps=50)
    assert publisher.sent == [name.encode() for _, name in names]
    assert unpublished(database_url) == []


@pytest.mark.parametrize(
    ("backlog", "max_bytes", "first_batch", "prefetched"),
    [(3, 1024, 3, False), (4, 1024, 4, True), (9, 1024, 4, True), (3, 4, 2, True)],
)
def test_only_a_full_batch_starts_claiming_the_next(
    database_url: str,
    stop: StopSignal,
    backlog: int,
    max_bytes: int,
    first_batch: int,
    prefetched: bool,
) -> None:
    """A batch cut by neither the batch size nor the byte budget took everything deliverable,
    so no second claim runs beside it (it would take a core from the batch at low rates for
    nothing); a batch cut by either claims the next one while it is published."""
    write(database_url, [(f"k{i}", f"e{i}") for i in range(backlog)])  # 2-byte payloads
    publisher = ScriptedPublisher(fail=set())
    relay = relay_for(database_url, publisher, stop, batch_size=4, batch_max_bytes=max_bytes)
    try:
        relay.step()
        assert publisher.batches[0] == [f"e{i}".encode() for i in range(first_batch)]
        assert (relay.batches.prefetching) is prefetched
    finally:
        relay.leave()
        relay.shutdown()
    drain(relay_for(database_url, publisher, stop, batch_size=4))
    assert unpublished(database_url) == []


@pytest.mark.parametrize(
    ("backlog", "fail", "waits"), [(3, False, True), (4, False, False), (3, True, False)]
)
def test_a_batch_that_took_everything_is_followed_by_a_wait_not_a_claim(
    database_url: str, stop: StopSignal, backlog: int, fail: bool, waits: bool
) -> None:
    """After a batch cut by neither the batch size nor the byte budget, all delivered, the
    relay sleeps until a NOTIFY (or the poll interval) instead of claiming again at once (a
    claim that would find nothing: at low rates as long as the batch itself). A full batch, or
    one with a failure, is followed by the next claim straight away."""
    write(database_url, [(f"k{i}", f"e{i}") for i in range(backlog)])
    publisher = ScriptedPublisher(fail={b"e0"} if fail else set())
    relay = relay_for(database_url, publisher, stop, batch_size=4, exit_when_idle=False)
    waited: list[float] = []
    relay._wait = waited.append  # type: ignore[method-assign]
    try:
        relay.step()
    finally:
        relay.leave()
        relay.shutdown()
    assert publisher.batches == [[f"e{i}".encode() for i in range(backlog)]]
    assert waited == ([relay.settings.poll_interval] if waits else [])


def test_a_dead_letter_cleared_by_hand_is_due_at_once(database_url: str, stop: StopSignal) -> None:
    """A dead letter keeps no backoff: an operator who clears ``dead_lettered_at`` by hand (not
    through ``dead-letters retry``) sees the row, and the later rows of its key, go out at once,
    not after the backoff of its last attempt (up to --backoff-cap)."""
    write(database_url, [("a", "a1"), ("a", "a2")])
    publisher = ScriptedPublisher(fail={b"a1"}, result=Result.PERMANENT)
    relay = relay_for(database_url, publisher, stop, exit_when_idle=False, batch_size=10)
    try:
        relay.step()
        assert publisher.sent == [b"a1", b"a2"]  # a2 follows: dead letters do not block a key
        with psycopg.connect(database_url) as conn:
            due = conn.execute(
                "SELECT next_attempt_at <= now() FROM outbox_events WHERE payload = 'a1'"
            ).fetchone()
            assert due == (True,), "the dead letter kept the backoff of its last attempt"
            conn.execute("UPDATE outbox_events SET dead_lettered_at = NULL")
        for _ in range(100):  # up to the scan floor's next sample (a second), then a claim
            relay.step()
            if unpublished(database_url) == []:
                break
        assert publisher.sent == [b"a1", b"a2", b"a1"]
    finally:
        relay.leave()
        relay.shutdown()
