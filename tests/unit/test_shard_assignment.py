"""Shard assignment among relays (rendezvous hashing) and the advisory-lock classes: pure code."""

from __future__ import annotations

import random
from typing import Any

import pytest

from outbox.settings import SHARD_COUNT, OutboxSettings
from outbox_relay.shards import assignment, lock_class

INT4_MAX = 2**31 - 1


def _random_members(seed: int, count: int) -> list[int]:
    """Member ids as relays pick them: random in 1..2**31-1."""
    rng = random.Random(seed)
    return sorted(rng.sample(range(1, INT4_MAX + 1), count))


#: Member sets to check: small consecutive ids (hard on a weak hash) and random ones.
_SETS: list[tuple[str, list[int]]] = [
    *((f"consecutive-{n}", list(range(1, n + 1))) for n in range(1, 6)),
    *(
        (f"random-{n}-seed{seed}", _random_members(seed, n))
        for n in range(1, 6)
        for seed in range(8)
    ),
]


def _member_sets(low: int = 1, high: int = 5) -> list[Any]:
    return [
        pytest.param(members, id=name) for name, members in _SETS if low <= len(members) <= high
    ]


MEMBER_SETS = _member_sets()


def _split(members: list[int]) -> dict[int, frozenset[int]]:
    return {m: assignment(members, m) for m in members}


@pytest.mark.parametrize("members", MEMBER_SETS)
def test_every_shard_goes_to_exactly_one_member(members: list[int]) -> None:
    """The members' shard sets are disjoint and together cover all shards."""
    split = _split(members)
    owners = [m for shards in split.values() for m in shards]
    assert sorted(owners) == list(range(SHARD_COUNT))


@pytest.mark.parametrize("members", _member_sets(high=4))
def test_assignment_is_balanced(members: list[int]) -> None:
    """Each of n <= 4 members gets between 0.6 and 1.4 times its fair share of the shards."""
    fair = SHARD_COUNT / len(members)
    counts = {m: len(s) for m, s in _split(members).items()}
    for member, count in counts.items():
        assert 0.6 * fair <= count <= 1.4 * fair, (member, counts)


@pytest.mark.parametrize("members", _member_sets(high=4))
def test_a_joining_member_takes_shards_only_for_itself(members: list[int]) -> None:
    """When a member joins, the only shards that change hands go to the newcomer."""
    newcomer = max(members) + 12345
    before = _split(members)
    after = _split(sorted([*members, newcomer]))
    for member in members:
        assert after[member] <= before[member]
    moved = set().union(*(before[m] - after[m] for m in members))
    assert moved == set(after[newcomer])
    assert after[newcomer]


@pytest.mark.parametrize("members", _member_sets(low=2))
def test_a_leaving_member_hands_over_only_its_own_shards(members: list[int]) -> None:
    """When a member leaves, the others keep theirs and share out only the leaver's shards."""
    before = _split(members)
    for leaver in members:
        remaining = [m for m in members if m != leaver]
        after = _split(remaining)
        for member in remaining:
            assert before[member] <= after[member]
            assert after[member] - before[member] <= before[leaver]


def test_assignment_is_deterministic_and_independent_of_member_order() -> None:
    """Every relay computes the same split from the same membership, whatever the list order."""
    members = _random_members(99, 4)
    shuffled = list(reversed(members))
    for member in members:
        assert assignment(members, member) == assignment(members, member)
        assert assignment(members, member) == assignment(shuffled, member)


def test_a_non_member_gets_nothing() -> None:
    """A relay whose membership is not listed owns no shard."""
    assert assignment([1, 2, 3], 4) == frozenset()


def test_a_lone_member_owns_every_shard() -> None:
    """A single relay owns all shards."""
    assert assignment([42], 42) == frozenset(range(SHARD_COUNT))


def test_lock_class_is_stable() -> None:
    """The same outbox and kind always give the same lock class (relays must agree)."""
    settings = OutboxSettings()
    assert lock_class(settings, "shards") == lock_class(OutboxSettings(), "shards")


def test_lock_class_differs_by_outbox_and_kind() -> None:
    """Different schemas, prefixes and kinds of lock never share a class."""
    classes = {
        lock_class(OutboxSettings(schema=schema, table_prefix=prefix), kind)
        for schema in ("public", "billing")
        for prefix in ("outbox_", "orders_", "")
        for kind in ("shards", "members")
    }
    assert len(classes) == 2 * 3 * 2


@pytest.mark.parametrize("prefix", ["", "outbox_", "a", "x" * 41])
@pytest.mark.parametrize("kind", ["shards", "members"])
def test_lock_class_fits_a_non_negative_int4(prefix: str, kind: str) -> None:
    """pg_advisory_lock(int4, int4) takes the class: it must be within 0..2**31-1."""
    value = lock_class(OutboxSettings(table_prefix=prefix), kind)
    assert isinstance(value, int)
    assert 0 <= value <= INT4_MAX
