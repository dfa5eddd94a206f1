"""Which rows of a prefetched batch wait behind an undelivered row of the batch before (pure)."""

from __future__ import annotations

from outbox_relay.pipeline import held_back, undelivered_by_key
from outbox_relay.ports import ClaimedRow, Outcome, Result


def row(row_id: int, key: bytes | None) -> ClaimedRow:
    return ClaimedRow(row_id, f"e{row_id}", "t", key, b"", (), (), 0)


def test_undelivered_rows_are_grouped_by_key_and_keyless_ones_ignored() -> None:
    rows = [row(1, b"a"), row(2, b"b"), row(3, b"a"), row(4, None)]
    outcomes = [
        Outcome(1, Result.RETRY, "x"),
        Outcome(2, Result.DELIVERED),
        Outcome(3, Result.NOT_SENT, "held"),
        Outcome(4, Result.BROKER, "down"),
    ]
    assert undelivered_by_key(rows, outcomes) == {b"a": [1, 3]}


def test_later_rows_of_an_undelivered_key_are_held_other_keys_flow() -> None:
    nxt = [row(5, b"a"), row(6, b"b"), row(7, b"a"), row(8, None)]
    assert held_back(nxt, {b"a": [1]}) == {5, 7}


def test_an_undelivered_row_claimed_again_goes_first_and_its_followers_may_follow() -> None:
    nxt = [row(1, b"a"), row(5, b"a")]
    assert held_back(nxt, {b"a": [1]}) == set()


def test_a_missing_undelivered_row_holds_back_even_if_an_earlier_one_is_back() -> None:
    """1 is claimed again but 3 (also undelivered, after 1) is not: 5 must wait behind 3."""
    nxt = [row(1, b"a"), row(5, b"a")]
    assert held_back(nxt, {b"a": [1, 3]}) == {5}


def test_nothing_undelivered_holds_nothing() -> None:
    assert held_back([row(1, b"a")], {}) == set()
