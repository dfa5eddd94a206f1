"""How a batch consume loop splits a batch after one dedup claim: first copies of new ids go to
the handler, in order; ids claimed before and second copies in the batch are skipped."""

from __future__ import annotations

from typing import Any

from outbox.consumer import first_copies


def test_first_copies_keep_the_order_and_skip_the_rest() -> None:
    messages: list[Any] = ["m1", "m2", "m3", "m4", "m5"]
    ids = ["a", "b", "a", "c", "d"]
    fresh, skipped = first_copies(messages, ids, new={"a", "c", "d"})
    assert fresh == [("m1", "a"), ("m4", "c"), ("m5", "d")]
    assert skipped == [("m2", "b"), ("m3", "a")]


def test_the_claimed_set_is_left_as_it_was() -> None:
    new = {"a"}
    messages: list[Any] = ["m1", "m2"]
    first_copies(messages, ["a", "a"], new)
    assert new == {"a"}
