"""The one timing loop: every kernel and library call is timed through it."""

from __future__ import annotations

import time
from typing import Callable


def wall_clock(call: Callable[[], object]) -> float:
    """Seconds one call takes on the host's clock."""
    t0 = time.perf_counter()
    call()
    return time.perf_counter() - t0


def time_calls(call: Callable[[], object], least: int, most: int, budget_s: float,
               clock: Callable[[Callable[[], object]], float] = wall_clock) -> list[float]:
    """Seconds per sample of ``call`` by ``clock``: ``least`` to ``most`` samples, stopping
    once ``budget_s`` is spent (a GPU clock may time several launches as one sample)."""
    times: list[float] = []
    while len(times) < most:
        times.append(clock(call))
        if len(times) >= least and sum(times) >= budget_s:
            break
    return times
