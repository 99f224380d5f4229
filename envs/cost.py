"""The cost-model slot of the environment and an analytical stand-in for it.

Any object with ``predict(schedules) -> log seconds`` (and ``update(records)``)
fits the slot; the learned model lives in ``agents``. Only ratios of predictions
are used, so the scale does not matter.
"""

from __future__ import annotations

import math
from typing import Protocol, Sequence

import numpy as np

from kernels.ir.schedule import Schedule
from kernels.target import Target


class CostModel(Protocol):
    def predict(self, schedules: Sequence[Schedule]) -> np.ndarray: ...

    def update(self, records) -> None: ...


class AnalyticalCostModel:
    """A crude stand-in, not a learned model: FLOPs over an estimated throughput.

    Throughput grows with the threads a parallel loop can use, the SIMD width when the
    innermost loop is vectorized over a contiguous extent, a register tile
    (``cache_write`` with unrolled loops inside), and packed operands.
    """

    def __init__(self, target: Target):
        self.target = target

    def _log_time(self, s: Schedule) -> float:
        nest, t = s.nest, self.target
        rate = 1.0
        for loop in nest.loops:
            if loop.kind == "parallel":
                rate *= min(t.cores, loop.extent)
        inner = nest.loops[-1]
        if inner.kind == "vectorize":
            rate *= min(t.vector_lanes, inner.extent) ** 0.8
        if nest.cache_write:
            unrolled = math.prod(l.extent for l in nest.inside(nest.cache_write) if l.kind == "unroll")
            rate *= 1.0 + min(unrolled, 8) / 4
        rate *= 1.0 + 0.25 * len(nest.cache_reads)
        return math.log(s.op.flops / rate)

    def predict(self, schedules: Sequence[Schedule]) -> np.ndarray:
        return np.array([self._log_time(s) for s in schedules])

    def update(self, records) -> None:
        """Nothing to learn."""
