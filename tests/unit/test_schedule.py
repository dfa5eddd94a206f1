"""The chores' schedule (``Schedule``): each task when due, and how long a wait may last."""

from __future__ import annotations

from outbox_relay.schedule import Schedule, Task


def test_tasks_run_when_due_and_say_when_they_are_due_next() -> None:
    ran: list[tuple[str, float]] = []

    def every(name: str, seconds: float) -> Task:
        def run(now: float) -> float:
            ran.append((name, now))
            return now + seconds

        return Task(name, run, ends_wait=name == "rebalance")

    schedule = Schedule([every("rebalance", 2.0), every("progress", 10.0)])
    schedule.run_due(0.0)
    schedule.run_due(1.0)
    schedule.run_due(2.0)
    assert ran == [("rebalance", 0.0), ("progress", 0.0), ("rebalance", 2.0)]
    assert schedule.until_next(3.5) == 0.5  # the rebalance ends a wait; progress does not
    schedule.make_due("progress")
    schedule.run_due(3.5)
    assert ran[-1] == ("progress", 3.5)
    schedule.make_due("not scheduled")  # ignored
