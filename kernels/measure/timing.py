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


class Rejected(Exception):
    """The verified call failed its check: timing stops, and the worker reports the
    reason as a failed result (it never leaves the worker as an exception)."""


class VerifiedCall:
    """Checks one call of the timing loop, the one at index ``at`` (drawn at random by
    the worker, so a kernel cannot tell which of its calls is looked at).

    ``prepare`` (refill the output with NaN) runs before that call's clock starts and
    ``verify`` after it stops, so neither counts in its time; ``verify(call)`` returns
    why the call was wrong, or None. When timing stops before call ``at``, :meth:`finish`
    makes one more call, untimed, and verifies that instead: the sample count stays what
    the time budget gave.
    """

    def __init__(self, at: int, prepare: Callable[[], object],
                 verify: Callable[[str], str | None]):
        self.at, self.prepare, self.verify = at, prepare, verify
        self.calls = 0          # samples timed so far
        self.verified = False

    def clock(self, clock: Callable[[Callable[[], object]], float] = wall_clock
              ) -> Callable[[Callable[[], object]], float]:
        """``clock``, with the drawn sample verified (raises :class:`Rejected`)."""
        def sample(call: Callable[[], object]) -> float:
            i = self.calls
            self.calls += 1
            if i != self.at:
                return clock(call)
            self.prepare()
            seconds = clock(call)
            self._check(f"timed call {i + 1}")
            return seconds
        return sample

    def finish(self, call: Callable[[], object]) -> None:
        """Verify one more call if timing stopped before the drawn one."""
        if not self.verified:
            self.prepare()
            call()
            self._check(f"call {self.calls + 1} (after timing)")

    def _check(self, name: str) -> None:
        self.verified = True
        error = self.verify(name)
        if error:
            raise Rejected(error)
