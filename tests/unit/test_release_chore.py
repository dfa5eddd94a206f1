"""The relay's release chore (outbox_relay.chores): when it is due again after a release of
scheduled events, and that a failing release leaves the claims alone."""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Any, cast

import psycopg
import pytest

from outbox_relay.chores import CHORE_RETRY, RELEASE_LOOK, RELEASE_SOON, Chores, Totals
from outbox_relay.claims import Release
from outbox_relay.config import RelaySettings
from outbox_relay.ports import NoMetrics

NOW = 1000.0


@dataclass
class FakeConnection:
    broken: bool = False
    closed: bool = False
    rollbacks: int = 0

    def rollback(self) -> None:
        self.rollbacks += 1


@dataclass
class FakeSource:
    """``OutboxSource.release_due``'s answers, in turn; raises an answer that is an error."""

    answers: list[Release | Exception]
    connection: FakeConnection = field(default_factory=FakeConnection)
    batches: list[int] = field(default_factory=list)

    def release_due(self, batch: int) -> Release:
        self.batches.append(batch)
        answer = self.answers.pop(0)
        if isinstance(answer, Exception):
            raise answer
        return answer


@dataclass
class FakePipeline:
    source: FakeSource


def chores(*answers: Release | Exception) -> tuple[Chores, FakeSource]:
    source = FakeSource(list(answers))
    settings = RelaySettings(
        database_url="postgresql://unused/db", kafka_bootstrap_servers="unused:9092", batch_size=10
    )
    made = Chores(
        settings,
        cast("Any", FakePipeline(source)),
        cast("Any", None),
        cast("Any", None),
        NoMetrics(),
        Totals(),
        lambda: NOW,
    )
    return made, source


@pytest.mark.parametrize(
    ("answer", "due"),
    [
        (Release(10, -0.5), NOW),  # a full batch: more may be due, at once
        (Release(3, 0.2), NOW + 0.2),  # the next falls due before the look
        (Release(0, 30.0), NOW + RELEASE_LOOK),  # far ahead: a writer may schedule sooner
        (Release(0, None), NOW + RELEASE_LOOK),  # nothing scheduled
        (Release(0, None, mine=False), NOW + RELEASE_SOON),  # another relay's turn
        (Release(2, -0.01), NOW + RELEASE_SOON),  # a due row was locked (a cancel under way)
    ],
)
def test_the_release_is_due_again_by_what_it_found(answer: Release, due: float) -> None:
    made, source = chores(answer)
    assert made.release_due(NOW) == pytest.approx(due)
    assert source.batches == [10]  # a batch is the relay's --batch-size


def test_due_rows_left_behind_hold_waits_off_and_back_off_until_released() -> None:
    """While due rows are left for later (locked by a cancel not committed, or another relay
    releasing), the next release backs off (doubling up to the look) and a wait may not end
    for those rows before it; a release that leaves none lifts the hold."""
    left = Release(0, -1.0)
    made, _ = chores(left, left, left, left, left, left, Release(1, 20.0))
    hold = [made.release_due(NOW) - NOW for _ in range(6)]
    assert hold == pytest.approx([0.05, 0.1, 0.2, 0.4, 0.8, RELEASE_LOOK])
    assert made.release_hold == pytest.approx(NOW + RELEASE_LOOK)
    assert made.release_due(NOW) == NOW + RELEASE_LOOK
    assert made.release_hold == -math.inf
    made, _ = chores(left, Release(0, None))
    made.release_due(NOW)
    made.release_due(NOW)
    assert made._release_backoff == RELEASE_SOON  # starts over after a release that was free


def test_the_release_does_not_end_waits_and_its_failure_is_housekeeping() -> None:
    """The release does not end a wait by itself (the wait ends when scheduled events fall
    due); one that fails with a good connection is logged, rolled back and tried again later,
    the loop goes on, and waits are not ended for due rows before that retry."""
    made, source = chores(psycopg.errors.QueryCanceled("statement timeout"))
    [task] = [t for t in made.schedule()._tasks.values() if t.name == "release"]
    assert not task.ends_wait
    assert task.run(NOW) == NOW + CHORE_RETRY
    assert made.release_hold == NOW + CHORE_RETRY
    assert source.connection.rollbacks == 1


def test_a_broken_connection_is_the_loops_outage() -> None:
    made, source = chores(psycopg.OperationalError("server closed the connection"))
    source.connection.broken = True
    with pytest.raises(psycopg.OperationalError):
        made.housekeeping("release", made.release_due)(NOW)


def test_each_release_tells_the_wait_when_the_next_event_falls_due() -> None:
    """So that a wait begun after a release ends at the next due time from its start, rather
    than when its first call returns (a quarter of a second later, at worst)."""
    made, _ = chores(Release(2, 0.1), Release(0, None), Release(0, None, mine=False))
    told: list[float | None] = []
    made.expect_due = told.append
    for _ in range(3):
        made.release_due(NOW)
    assert told == [pytest.approx(NOW + 0.1), None, None]
