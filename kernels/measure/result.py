"""What is measured and what comes back: typed candidates and results (TVM's
``MeasureInput``/``RunnerResult``), and the protocols a measurement backend implements."""

from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Iterator, NamedTuple, Protocol

from ..codegen import render
from ..codegen.kernel import Kernel
from ..ir.ops import Operator
from ..ir.schedule import Schedule
from ..target import Target
from .tuning_log import TuningRecord


class Rival(NamedTuple):
    """A CPU kernel timed in turn with the one measured, a short block of calls each, in
    the same worker (both checked, a random call of each verified): each pair sees one
    moment of a shared machine whose speed changes from one stretch of milliseconds to
    the next."""

    kernel: Kernel
    path: str
    pairs: int = 0    # pairs of blocks at most, within the time budget; 0: the runner's repeats
    budget_s: float = 0.0   # seconds of pairs; 0: the runner's min_time_s


@dataclass(frozen=True)
class Candidate:
    """One kernel to measure: its operator, the schedule it came from as JSON data (what
    the tuning log stores and the cache is keyed by) and its rendered source."""

    op: Operator
    schedule: Any
    kernel: Kernel

    @classmethod
    def of(cls, schedule: Schedule, target: Target) -> "Candidate":
        """Render ``schedule`` for ``target`` (a ``ScheduleError`` if it breaks a rule)."""
        return cls(schedule.op, schedule.steps_json(), render(schedule, target))


@dataclass(frozen=True)
class MeasureResult:
    """Outcome of building and timing one kernel; failures are values too."""

    ok: bool                          # built, ran, was correct and was timed
    time_ms: float                    # median of times_ms; inf when failed
    times_ms: tuple[float, ...]
    gflops: float                     # 0 when failed
    correct: bool                     # output matched the reference
    error: str | None                 # short reason when not ok
    build_s: float = 0.0              # seconds spent compiling
    run_s: float = 0.0                # seconds spent running (check + timing)
    library_times_ms: tuple[float, ...] = ()  # the library, timed alternately with the kernel
    rival_times_ms: tuple[float, ...] = ()    # a Rival's block medians, each paired with times_ms' at its index

    @classmethod
    def failure(cls, error: str, correct: bool = False, build_s: float = 0.0,
                run_s: float = 0.0) -> "MeasureResult":
        return cls(False, math.inf, (), 0.0, correct, error, build_s, run_s)

    @property
    def transient(self) -> bool:
        """A failure that a loaded machine can cause (a compile or run timeout): measured
        again when next asked for, never remembered as the kernel's result."""
        return not self.ok and (self.error or "").startswith(("compile timeout", "timeout after"))

    @classmethod
    def from_record(cls, r: TuningRecord) -> "MeasureResult":
        """A result recalled from a tuning log (nothing was spent on it now)."""
        ok = r.correct and r.error is None and 0 < r.time_ms < math.inf
        return cls(ok, r.time_ms if ok else math.inf, tuple(r.times_ms), r.gflops if ok else 0.0,
                   r.correct, r.error)


@dataclass(frozen=True)
class BuildResult:
    path: str | None                  # the shared object, None when the build failed
    error: str | None
    build_s: float
    cached: bool = False              # found already built

    @property
    def ok(self) -> bool:
        return self.path is not None


class BuilderProtocol(Protocol):
    """Compiles kernels: :class:`kernels.measure.build.Builder` here, or on a Ray cluster."""

    def build(self, kernels: list[Kernel]) -> list[BuildResult]: ...


class RunnerProtocol(Protocol):
    """Checks and times built kernels: :class:`kernels.measure.runner.Runner` here, or on a
    Ray cluster (several devices side by side)."""

    def run(self, op: Operator, kernel: Kernel, path: str, library: bool = False,
            slow_cutoff_s: float | None = None, rival: Rival | None = None) -> MeasureResult: ...

    def run_many(self, op: Operator, jobs: list[tuple[Kernel, str]], library: bool = False,
                 slow_cutoff_s: float | None = None, rival: Rival | None = None) -> Iterator[MeasureResult]: ...

    def close(self) -> None: ...
