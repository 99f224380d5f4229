"""Spends one budget of hardware measurements over a network's tasks (Ansor's task scheduler).

The objective is the network's time, the sum over tasks of weight x best time. Every
task first gets one measurement (its expert schedule, or the search's first pick),
heaviest first; then, a chunk at a time, the task whose objective is predicted to fall
most per measurement gets the next chunk:

    gradient_i = weight_i * (ALPHA * recent_i + (1 - ALPHA) * best_i / n_i)

``recent_i`` is how fast its best time fell over its last chunk, ``best_i / n_i`` an
optimistic guess that is large while a task has few measurements. Each task keeps one
evolutionary search (``agents.search``) that a new chunk continues: a measured schedule
is never measured again, and measurements already in the tuning database count as
spent, so a second run with the same budget measures nothing.
"""

from __future__ import annotations

import math
from dataclasses import dataclass, field
from typing import Callable

import numpy as np

from agents.search import AGENTS, Search
from kernels.experts import expert_schedule
from kernels.ir.ops import Operator
from kernels.measure import Measurer

from . import database

ALPHA = 0.5
CHUNK = 8


@dataclass
class Task:
    op: Operator
    weight: int
    search: Search
    known: int = 0                  # measurements of it the database held at the start
    exhausted: bool = False         # its search stopped before spending what it was given
    history: list[tuple[int, float]] = field(default_factory=list)   # (measurements, best ms) per chunk

    @property
    def spent(self) -> int:
        return len(self.search.measured)

    @property
    def best_ms(self) -> float:
        return self.search.best_result.time_ms if self.search.best_result else math.inf

    def gradient(self) -> float:
        if self.exhausted:
            return 0.0
        best = self.best_ms
        if best == math.inf:    # nothing correct yet: one more chunk, then it is given up
            return math.inf if len(self.history) < 2 else 0.0
        recent = 0.0
        if len(self.history) >= 2:
            (n0, t0), (n1, t1) = self.history[-2], self.history[-1]
            recent = max(0.0, t0 - t1) / max(1, n1 - n0)
        return self.weight * (ALPHA * recent + (1 - ALPHA) * best / max(1, self.spent))


def adopt_known(search: Search) -> int:
    """Enter into ``search`` what its measurer's cache (the database) holds for its operator on
    this machine, as if it had measured it; returns how many."""
    for _, schedule, res in database.records(search.measurer.cache, search.op, search.target):
        key = schedule.kernel_key()
        search.measured[key], search.schedules[key] = res, schedule
        if res.ok and (search.best_result is None or res.time_ms < search.best_result.time_ms):
            search.best, search.best_result = schedule, res
    return len(search.measured)


class TaskScheduler:
    """Runs the search of each task for the measurements the scheduler gives it."""

    def __init__(self, tasks: list[tuple[Operator, int]], measurer: Measurer, model, policy_for: Callable,
                 seed: int = 0):
        self.measurer, self.model, self.policy_for = measurer, model, policy_for
        self.rng = np.random.default_rng(seed)
        self.on_chunk: Callable[[Task, int], None] | None = None   # a task is given n measurements
        self.on_measure: Callable[[Task], None] | None = None      # after each measurement
        self.tasks: list[Task] = []
        for op, weight in tasks:
            search = Search(op, measurer.target, measurer, 0)
            task = Task(op, weight, search, known=adopt_known(search))
            search.on_progress = lambda p, task=task: self.on_measure and self.on_measure(task)
            self.tasks.append(task)

    @property
    def known(self) -> int:
        return sum(t.known for t in self.tasks)

    def run(self, budget: int) -> int:
        """Spend up to ``budget`` measurements in all (the database's included); returns
        how many were made now."""
        made = 0
        left = budget - self.known
        for task in self.tasks:          # heaviest first: one measurement each, if never tuned
            if left <= 0:
                break
            if task.known == 0:
                n = self._give(task, 1)
                made, left = made + n, left - n
        while left > 0:
            task = max(self.tasks, key=Task.gradient)
            if task.gradient() <= 0:
                break
            n = self._give(task, min(CHUNK, left))
            made, left = made + n, left - n
        return made

    def _give(self, task: Task, n: int) -> int:
        """Let ``task``'s search make ``n`` more measurements; returns how many it made."""
        if self.on_chunk:
            self.on_chunk(task, n)
        search = task.search
        before = len(search.measured)
        search.budget = before + n
        if before == 0:
            try:
                search.measure([expert_schedule(task.op, search.target)])
            except ValueError:
                pass     # no expert for this operator: the search starts from its own picks
        if search.left > 0:
            AGENTS["evolve"](search, self.rng, model=self.model, policy=self.policy_for(task.op))
        made = len(search.measured) - before
        if made < n:
            task.exhausted = True
        task.history.append((task.spent, task.best_ms))
        return made

