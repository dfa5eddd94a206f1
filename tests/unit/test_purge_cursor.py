"""The purge (``Purge``) over a table simulated in memory: the partitions it asks for, which
rows marked in place each cursor step deletes, where the cursor stops, when a pass gives the
relay its turn, and when the walk rests."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox_relay.retention import (
    PARTITIONS_AHEAD,
    Expiry,
    Purge,
    PurgePass,
    PurgeStep,
    partition_span,
)


@dataclass
class Table:
    """Row id -> age of its publication in seconds (None: unpublished)."""

    rows: dict[int, float | None]
    steps: list[int] = field(default_factory=list)
    prepared: list[tuple[float, float]] = field(default_factory=list)
    expired: list[float] = field(default_factory=list)

    def prepare_partitions(self, span: float, ahead: float) -> int:
        self.prepared.append((span, ahead))
        return 0

    def expire_partitions(self, retention: float) -> Expiry:
        self.expired.append(retention)
        return Expiry(partitions=2, deleted=1, overdue=0.5)

    def purge_chunk(self, from_id: int, rows: int, retention: float) -> PurgeStep:
        self.steps.append(from_id)
        chunk = sorted(i for i in self.rows if i >= from_id)[:rows]
        old = [i for i in chunk if (age := self.rows[i]) is not None and age > retention]
        young = [i for i in chunk if (age := self.rows[i]) is not None and age <= retention]
        for i in old:
            del self.rows[i]
        return PurgeStep(len(chunk), max(chunk, default=None), len(old), min(young, default=None))


class Clock:
    def __init__(self, step: float = 0.0) -> None:
        self.now, self.step = 0.0, step

    def __call__(self) -> float:
        self.now += self.step
        return self.now


def test_a_pass_deletes_up_to_the_first_young_row_and_resumes_there() -> None:
    table = Table({1: 100, 2: None, 3: 100, 4: 5, 5: 100, 6: None})
    purge = Purge(retention=60, chunk=2)
    assert purge.run(table, Clock()) == passed(2)
    assert sorted(table.rows) == [2, 4, 5, 6]  # 5 is past the frontier: not looked at yet
    assert purge.cursor == 4
    table.rows[4] = 100  # it aged
    assert purge.run(table, Clock()) == passed(2)
    assert table.steps[-2:] == [4, 6]
    assert sorted(table.rows) == [2, 6]


def test_a_pass_out_of_budget_is_not_caught_up_and_the_next_one_goes_on() -> None:
    table = Table(dict.fromkeys(range(1, 101), 100.0))
    purge = Purge(retention=60, chunk=10, budget=0.25)
    clock = Clock(step=0.1)  # each step takes 0.1 s
    assert purge.run(table, clock) == passed(30, caught_up=False)
    assert purge.run(table, clock) == passed(30, caught_up=False)
    assert purge.cursor == 61


def test_rows_passed_while_unpublished_are_purged_once_the_cursor_starts_over() -> None:
    table = Table({1: None, 2: 100, 3: 100})
    purge = Purge(retention=60, chunk=10, restart_every=60)
    clock = Clock()
    assert purge.run(table, clock) == passed(2)
    table.rows[1] = 100  # published later, and aged
    assert purge.run(table, clock) == passed(0)  # the cursor is past it
    clock.now = 61
    assert purge.run(table, clock) == passed(1)
    assert table.rows == {}


def test_start_over_goes_back_to_the_lowest_id() -> None:
    table = Table({1: None, 2: 100})
    purge = Purge(retention=60)
    purge.run(table, Clock())
    purge.run(table, Clock())
    purge.start_over()
    purge.run(table, Clock())
    assert table.steps == [0, 3, 0]


def passed(deleted: int, caught_up: bool = True) -> PurgePass:
    """What a pass over ``Table`` returns: its expiry drops 2 partitions and deletes 1 row."""
    return PurgePass(deleted + 1, 2, caught_up, 0.5)


def test_each_pass_makes_partitions_ahead_and_drops_the_expired_ones_first() -> None:
    table = Table({})
    purge = Purge(retention=3600)
    assert purge.run(table, Clock()) == passed(0)
    assert table.prepared == [(450, 450 * PARTITIONS_AHEAD)]
    assert table.expired == [3600]


def test_a_walk_that_finds_no_row_marked_in_place_rests_until_the_recheck() -> None:
    """Only relays of versions before migration 0008 mark rows in place: once a walk from the
    lowest id finds none, the cursor stops reading the outbox table until ``recheck_every``."""
    table = Table({1: None, 2: None})
    purge = Purge(retention=60, chunk=10, restart_every=60, recheck_every=600)
    clock = Clock()
    assert purge.run(table, clock) == passed(0)
    table.rows[3] = 100  # marked in place by an old relay still running
    clock.now = 61
    assert purge.run(table, clock) == passed(0)
    assert table.steps == [0], "the walk went on after finding nothing"
    clock.now = 601
    assert purge.run(table, clock) == passed(1)
    assert table.steps == [0, 0]
    assert 3 not in table.rows


def test_a_walk_that_finds_rows_marked_in_place_walks_again_at_the_restart() -> None:
    table = Table({1: 100, 2: None})
    purge = Purge(retention=60, chunk=10, restart_every=60, recheck_every=600)
    clock = Clock()
    assert purge.run(table, clock) == passed(1)
    table.rows[1] = 100
    clock.now = 61
    assert purge.run(table, clock) == passed(1)
    assert table.steps == [0, 0]


def test_a_partition_spans_an_eighth_of_the_retention_in_whole_seconds_from_1s_to_a_day() -> None:
    assert partition_span(3600) == 450
    assert partition_span(60) == 8
    assert partition_span(3) == 1
    assert partition_span(30 * 86_400) == 86_400
