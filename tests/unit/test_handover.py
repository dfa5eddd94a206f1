"""Shards taken over after a relay went uncleanly wait for its linger: pure bookkeeping."""

from __future__ import annotations

from outbox_relay.handover import Handover


class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_shards_acquired_while_nobody_lingers_are_claimable_at_once() -> None:
    """No relay went uncleanly (wait 0): the handover holds nothing back."""
    clock = Clock()
    handover = Handover(clock)
    handover.acquired({1, 2}, 0.0)
    assert handover.claimable(frozenset({1, 2, 3})) == {1, 2, 3}
    assert handover.waiting() == 0.0


def test_shards_acquired_during_a_linger_wait_until_it_ends() -> None:
    """Only the shards acquired during the linger wait, and only until it ends; shards held
    before stay claimable (a gone relay never held them)."""
    clock = Clock()
    handover = Handover(clock)
    handover.acquired({1, 2}, 7.0)
    assert handover.claimable(frozenset({1, 2, 3})) == {3}
    assert handover.waiting() == 7.0
    clock.now += 6.9
    assert handover.claimable(frozenset({1, 2, 3})) == {3}
    clock.now += 0.2
    assert handover.claimable(frozenset({1, 2, 3})) == {1, 2, 3}
    assert handover.waiting() == 0.0


def test_a_later_linger_extends_a_shard_and_an_earlier_one_never_shortens_it() -> None:
    clock = Clock()
    handover = Handover(clock)
    handover.acquired({1}, 10.0)
    handover.acquired({1}, 2.0)
    clock.now += 5
    assert handover.claimable(frozenset({1})) == frozenset()
    handover.acquired({1}, 20.0)
    clock.now += 10
    assert handover.claimable(frozenset({1})) == frozenset()
    assert handover.waiting() == 10.0


def test_a_released_shard_forgets_its_wait() -> None:
    """A shard released and acquired again later is judged by the later acquisition alone."""
    clock = Clock()
    handover = Handover(clock)
    handover.acquired({1, 2}, 10.0)
    handover.released({1})
    handover.acquired({1}, 0.0)
    assert handover.claimable(frozenset({1, 2})) == {1}
