"""The front door to measurement: schedules in, one result each, each distinct one measured once.

``Measurer.measure`` renders and keys candidates itself, builds a whole batch first
(compiles run in parallel), then runs it one kernel at a time, so timing never runs
beside compiles. CUDA kernels are compiled by NVRTC inside the worker, on the GPU
they run on: the builder only stores their source, and the NVRTC time comes back as
the result's ``build_s``.
"""

from __future__ import annotations

import logging
import os
import threading
from dataclasses import replace
from typing import Sequence

from ..ir.schedule import Schedule
from ..target import Target
from .build import Builder
from .result import BuilderProtocol, Candidate, MeasureResult, RunnerProtocol
from .runner import Runner
from .tuning_log import MeasureKey, TuningLog, TuningRecord, measure_key

logger = logging.getLogger(__name__)


class Measurer:
    """Measures schedules of an operator, each distinct schedule once.

    Results are cached by (op kind, shape, schedule key, target kind, device,
    compiler); with a tuning log, the cache starts from the log's records and every
    new measurement is appended to it. The builder/runner pair decides where kernels
    compile and run: :class:`Builder`/:class:`Runner` on this machine, or
    :func:`kernels.measure.cluster.backend` on a Ray cluster. Several threads may measure at
    once (envs stepping in parallel); cache and log are updated under a lock.
    """

    def __init__(self, target: Target, builder: BuilderProtocol | None = None,
                 runner: RunnerProtocol | None = None, log: TuningLog | str | os.PathLike | None = None,
                 cache: bool = True):
        self.target = target
        self.builder = builder or Builder()
        # GPU kernels run in milliseconds: one that takes 30 s to compile and run is hopeless
        self.runner = runner or Runner(timeout_s=30.0 if target.kind == "cuda" else 60.0)
        self.log = log if isinstance(log, TuningLog) or log is None else TuningLog(log, target)
        self.use_cache = cache
        self.cache: dict[MeasureKey, MeasureResult] = {}
        self.measured = 0         # new measurements made (cache misses)
        self.build_s = 0.0        # seconds spent compiling, over all of them
        self.run_s = 0.0          # seconds spent checking and timing, over all of them
        self._lock = threading.Lock()
        if cache and self.log is not None:
            self.preload(self.log)

    def preload(self, log: TuningLog) -> int:
        """Fill the cache from ``log``; returns how many records were taken (impossible
        ones, judged against this target's peak, are skipped)."""
        n = 0
        for r in log.records(self.target):
            res = MeasureResult.from_record(r)
            if not res.transient:
                self.cache[r.key] = res
                n += 1
        return n

    def key(self, c: Candidate) -> MeasureKey:
        t = self.target
        return measure_key(c.op.kind, c.op.shape, c.schedule, t.kind, t.device, t.compiler, c.op.dtype)

    def measure(self, items: Sequence[Schedule | Candidate]) -> list[MeasureResult]:
        """One result per schedule (rendered for this target here) or candidate (a kernel
        written some other way), in order; all of one operator."""
        cands = [c if isinstance(c, Candidate) else Candidate.of(c, self.target) for c in items]
        if not cands:
            return []
        op = cands[0].op
        if any((c.op.kind, c.op.shape, c.op.dtype) != (op.kind, op.shape, op.dtype) for c in cands):
            raise ValueError("one measure() call takes candidates of one operator")
        mkeys = [self.key(c) for c in cands]
        results: dict[MeasureKey, MeasureResult] = {}
        todo: dict[MeasureKey, Candidate] = {}
        with self._lock:
            for mk, c in zip(mkeys, cands):
                if self.use_cache and mk in self.cache:
                    results[mk] = self.cache[mk]
                elif mk not in todo:    # duplicates in a batch are measured once
                    todo[mk] = c

        builds = self.builder.build([c.kernel for c in todo.values()])   # all compiles first...
        runs = self.runner.run_many(op, [(c.kernel, b.path) for c, b in zip(todo.values(), builds)
                                         if b.path is not None])         # ...then timing, alone
        for (mk, c), b in zip(todo.items(), builds):
            if b.path is None:
                res = MeasureResult.failure(b.error or "build failed", build_s=b.build_s)
            else:
                res = next(runs)
                res = replace(res, build_s=b.build_s + res.build_s)  # + NVRTC in the worker (CUDA)
            if not res.ok:
                logger.debug("%s %s: %s", op.kind, op.shape_str, res.error)
            results[mk] = res
            with self._lock:
                self.measured += 1
                self.build_s += res.build_s
                self.run_s += res.run_s
                if self.use_cache and not res.transient:
                    self.cache[mk] = res
                if self.log is not None:
                    self.log.append(self.record(c, res))
        return [results[mk] for mk in mkeys]

    def measure_one(self, item: Schedule | Candidate) -> MeasureResult:
        return self.measure([item])[0]

    def record(self, c: Candidate, res: MeasureResult) -> TuningRecord:
        t = self.target
        return TuningRecord(op=c.op.kind, shape=c.op.shape_str, target=t.kind, hardware=t.device,
                            compiler=t.compiler, schedule=c.schedule,
                            time_ms=res.time_ms, times_ms=res.times_ms, gflops=res.gflops,
                            correct=res.correct, error=res.error, dtype=c.op.dtype)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
