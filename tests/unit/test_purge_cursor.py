"""The purge's cursor (``Purge``) over a table simulated in memory: which rows
each step deletes, where the cursor stops, and when a pass gives the relay its turn."""

from __future__ import annotations

from dataclasses import dataclass, field

from outbox_relay.retention import Purge, PurgeStep


@dataclass
class Table:
    """Row id -> age of its publication in seconds (None: unpublished)."""

    rows: dict[int, float | None]
    steps: list[int] = field(default_factory=list)

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
    assert purge.run(table, Clock()) == (2, True)
    assert sorted(table.rows) == [2, 4, 5, 6]  # 5 is past the frontier: not looked at yet
    assert purge.cursor == 4
    table.rows[4] = 100  # it aged
    assert purge.run(table, Clock()) == (2, True)
    assert table.steps[-2:] == [4, 6]
    assert sorted(table.rows) == [2, 6]


def test_a_pass_out_of_budget_is_not_caught_up_and_the_next_one_goes_on() -> None:
    table = Table(dict.fromkeys(range(1, 101), 100.0))
    purge = Purge(retention=60, chunk=10, budget=0.25)
    clock = Clock(step=0.1)  # each step takes 0.1 s
    assert purge.run(table, clock) == (30, False)
    assert purge.run(table, clock) == (30, False)
    assert purge.cursor == 61


def test_rows_passed_while_unpublished_are_purged_once_the_cursor_starts_over() -> None:
    table = Table({1: None, 2: 100, 3: 100})
    purge = Purge(retention=60, chunk=10, restart_every=60)
    clock = Clock()
    assert purge.run(table, clock) == (2, True)
    table.rows[1] = 100  # published later, and aged
    assert purge.run(table, clock) == (0, True)  # the cursor is past it
    clock.now = 61
    assert purge.run(table, clock) == (1, True)
    assert table.rows == {}


def test_start_over_goes_back_to_the_lowest_id() -> None:
    table = Table({1: None, 2: 100})
    purge = Purge(retention=60)
    purge.run(table, Clock())
    purge.run(table, Clock())
    purge.start_over()
    purge.run(table, Clock())
    assert table.steps == [0, 3, 0]
