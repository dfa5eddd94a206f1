"""The relay's periodic chores (rebalance, purge, gauges, floor samples, progress) as a schedule:
each task runs when it is due and says when it is due next."""

from __future__ import annotations

import math
from collections.abc import Callable, Iterable
from dataclasses import dataclass


@dataclass
class Task:
    name: str
    #: Runs the chore at ``now``; returns when it is due next.
    run: Callable[[float], float]
    #: Whether a wait for events ends when this task falls due; others run at the next step.
    ends_wait: bool = False
    due: float = 0.0


class Schedule:
    def __init__(self, tasks: Iterable[Task]) -> None:
        self._tasks = {task.name: task for task in tasks}

    def run_due(self, now: float) -> None:
        """Every task due at ``now``, in the order given."""
        for task in self._tasks.values():
            if now >= task.due:
                task.due = task.run(now)

    def until_next(self, now: float) -> float:
        """Seconds until a task that ends waits is due (0 if one is)."""
        due = min((t.due for t in self._tasks.values() if t.ends_wait), default=math.inf)
        return max(0.0, due - now)

    def make_due(self, name: str) -> None:
        """Run ``name`` at the next ``run_due`` (a task not scheduled is ignored)."""
        task = self._tasks.get(name)
        if task is not None:
            task.due = 0.0

    def bring_forward(self, name: str, due: float) -> None:
        """Run ``name`` by ``due`` at the latest (a task not scheduled is ignored)."""
        task = self._tasks.get(name)
        if task is not None:
            task.due = min(task.due, due)
