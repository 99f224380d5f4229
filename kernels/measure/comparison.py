"""The figure a user reads: a kernel against the vendor library, over several rounds.

Each round times the kernel and the library in alternating blocks in one worker
(``Runner.run(..., library=True)``), so a machine whose speed drifts slows both
alike; the figures are medians over rounds, reported with their spread (max - min of
the rounds' medians), so a reader sees how far to trust them. Two CPU kernels are
compared by :func:`paired_ratio`: timed in turn in one worker, which rounds a second
apart cannot match on a shared host.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass

from ..codegen import render
from ..codegen.kernel import Kernel
from ..ir.ops import Operator
from ..ir.schedule import Schedule
from ..target import Target
from .result import MeasureResult, Rival, RunnerProtocol

PAIRS = 1000   # pairs of blocks at most (within the runner's time budget) in a paired_ratio
# runs of a paired_ratio, each with fresh buffers: kernels of the strided 3x3 convolution
# 1,64,56,56,128 that read their input in place (this project's CPU) ran 9-27% below their
# median ratio to the expert in one or two runs of 20, and one such run had made a tune
# return the expert where its best kernel ran at 1.09x it
PAIRED_RUNS = 3
# seconds of pairs in each: the three about as long as one plain run (``Runner.min_time_s``);
# a run each of 1 s had a tune of matmul 1024 spend 28 of its 73 s in its final comparison
PAIRED_RUN_S = 0.35


@dataclass(frozen=True)
class Comparison:
    rounds: tuple[MeasureResult, ...]

    @property
    def ok(self) -> bool:
        return bool(self.rounds) and all(r.ok for r in self.rounds)

    @property
    def error(self) -> str | None:
        return next((r.error for r in self.rounds if not r.ok), None if self.rounds else "not measured")

    def _kernel_ms(self) -> list[float]:
        return [r.time_ms for r in self.rounds]

    def _library_ms(self) -> list[float]:
        """Each round's library time; none where the library was not timed (or there is none)."""
        if not all(r.library_times_ms for r in self.rounds):
            return []
        return [statistics.median(r.library_times_ms) for r in self.rounds]

    @property
    def time_ms(self) -> float:
        return statistics.median(self._kernel_ms()) if self.ok else float("inf")

    @property
    def time_spread_ms(self) -> float:
        return max(self._kernel_ms()) - min(self._kernel_ms()) if self.ok else float("inf")

    @property
    def library_time_ms(self) -> float | None:
        return statistics.median(self._library_ms()) if self.ok and self._library_ms() else None

    @property
    def library_spread_ms(self) -> float | None:
        return max(self._library_ms()) - min(self._library_ms()) if self.ok and self._library_ms() else None

    @property
    def fraction_of_library(self) -> float | None:
        """Median over rounds of library time / kernel time (each round's pair timed
        together); 0 for a kernel that failed, None without a library."""
        if not self.ok:
            return 0.0
        if not self._library_ms():
            return None
        return statistics.median(lib / r.time_ms for lib, r in zip(self._library_ms(), self.rounds))

    def agrees_with(self, time_ms: float) -> bool:
        """Whether an earlier measurement of the same kernel lies within this one's spread
        (or within 10%, for spreads that small rounds underestimate)."""
        return abs(time_ms - self.time_ms) <= max(self.time_spread_ms, 0.1 * self.time_ms)


class ImpossibleTiming(ValueError):
    """A kernel timed faster than the machine's peak: a measurement error, never a result."""


def compare_with_library(runner: RunnerProtocol, op: Operator, kernels: list[tuple[Kernel, str]],
                         target: Target, rounds: int = 3, library: bool = True) -> list[Comparison]:
    """One Comparison per (kernel, built path): ``rounds`` rounds, each timing every kernel
    in turn against the library (or, without ``library``, the kernels alone), so figures of
    the kernels compare within one run too. A kernel that fails stops being timed."""
    results: list[list[MeasureResult]] = [[] for _ in kernels]
    for _ in range(rounds):
        for (kernel, path), done in zip(kernels, results):
            if done and not done[-1].ok:
                continue
            done.append(runner.run(op, kernel, path, library=library))
            gflops = op.flops / done[-1].time_ms / 1e6
            if done[-1].ok and gflops > target.peak_gflops:
                raise ImpossibleTiming(f"{kernel.name} timed at {gflops:.0f} GFLOPS, above this machine's "
                                       f"peak of {target.peak_gflops:.0f}: the timing is wrong")
    return [Comparison(tuple(r)) for r in results]


def paired_ratio(runner: RunnerProtocol, op: Operator, kernel: tuple[Kernel, str], rival: tuple[Kernel, str],
                 pairs: int = PAIRS, runs: int = PAIRED_RUNS) -> float | None:
    """The rival's time over the kernel's (both CPU kernels, with their built paths): in
    each of ``runs`` runs (``Runner.run``'s ``rival``, fresh buffers each), the median over
    pairs of short blocks timed in turn in one worker; the median of the runs. None where
    either failed."""
    ratios = []
    for _ in range(runs):
        r = runner.run(op, *kernel, rival=Rival(*rival, pairs, PAIRED_RUN_S))
        if not r.ok or not r.rival_times_ms:
            return None
        ratios.append(statistics.median(e / k for k, e in zip(r.times_ms, r.rival_times_ms)))
    return statistics.median(ratios)


def speedups_over(op: Operator, schedules: list[Schedule], reference: Schedule, target: Target, measurer,
                  rounds: int) -> list[float]:
    """The reference's time over each schedule's (0 for one that fails), with ``measurer``'s
    builder and runner: on a CPU each timed in turn with the reference (``paired_ratio``),
    on a GPU the median of per-round ratios, all timed in the same alternating rounds (no
    library: a ratio of two kernels needs none)."""
    kernels = [render(s, target, name=f"{op.kind}_{i}") for i, s in enumerate(schedules)]
    kernels.append(render(reference, target, name=f"{op.kind}_expert"))
    built = measurer.builder.build(kernels)
    ok = [(k, b.path) for k, b in zip(kernels, built) if b.ok]
    if not built[-1].ok:
        return [0.0] * len(schedules)
    if target.kind == "cpu":
        return [(paired_ratio(measurer.runner, op, (k, b.path), ok[-1]) or 0.0) if b.ok else 0.0
                for k, b in zip(kernels[:-1], built[:-1])]
    comps = iter(compare_with_library(measurer.runner, op, ok, target, rounds, library=False))
    comps = [next(comps) if b.ok else None for b in built]
    theirs = comps.pop()
    return [statistics.median(e.time_ms / c.time_ms for c, e in zip(c.rounds, theirs.rounds))
            if c is not None and c.ok and theirs.ok else 0.0 for c in comps]
