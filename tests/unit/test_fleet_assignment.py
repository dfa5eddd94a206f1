"""Which relay of a fleet serves which outbox (rendezvous hashing over outbox names): pure code."""

from __future__ import annotations

import random

import pytest

from outbox_relay.fleet import assignment

NAMES = [f"tenant-{n:03d}" for n in range(200)]


def _members(seed: int, count: int) -> list[int]:
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, 2**31), count))


def _given(spread: dict[str, int], members: list[int]) -> dict[int, frozenset[str]]:
    return {m: assignment(spread, members, m) for m in members}


@pytest.mark.parametrize("count", [1, 2, 3, 5])
@pytest.mark.parametrize("seed", range(4))
def test_every_outbox_goes_to_exactly_its_number_of_relays(count: int, seed: int) -> None:
    members = _members(seed, count)
    spread = {name: 1 + n % 3 for n, name in enumerate(NAMES)}
    given = _given(spread, members)
    for name, relays in spread.items():
        holders = [m for m in members if name in given[m]]
        assert len(holders) == min(relays, count), name


@pytest.mark.parametrize("seed", range(4))
def test_outboxes_are_spread_evenly_enough(seed: int) -> None:
    """With 200 outboxes over 4 relays, no relay gets less than half or more than twice its
    share (50)."""
    members = _members(seed, 4)
    given = _given(dict.fromkeys(NAMES, 1), members)
    assert all(25 <= len(names) <= 100 for names in given.values()), {
        m: len(n) for m, n in given.items()
    }


@pytest.mark.parametrize("seed", range(4))
def test_a_relay_leaving_moves_only_its_own_outboxes(seed: int) -> None:
    members = _members(seed, 4)
    spread = dict.fromkeys(NAMES, 1)
    before = _given(spread, members)
    gone = members[1]
    after = _given(spread, [m for m in members if m != gone])
    for member, names in after.items():
        assert before[member] <= names
        assert names - before[member] <= before[gone]


def test_a_member_not_in_the_list_is_given_nothing() -> None:
    assert assignment(dict.fromkeys(NAMES, 2), [1, 2, 3], 4) == frozenset()


def test_a_lone_relay_serves_every_outbox() -> None:
    assert assignment(dict.fromkeys(NAMES, 3), [7], 7) == frozenset(NAMES)
