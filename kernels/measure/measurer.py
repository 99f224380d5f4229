"""The front door to measurement: schedules in, one result each, each distinct one measured once.

``Measurer.measure`` renders and keys candidates itself, builds a whole batch first
(compiles run in parallel), then runs it one kernel at a time, so timing never runs
beside compiles. ``Measurer.submit`` measures a batch in the background, so a search
can propose the next batch while a cluster's devices work on this one. CUDA kernels are compiled by NVRTC inside the worker, on the GPU
they run on: the builder only stores their source, and the NVRTC time comes back as
the result's ``build_s``.
"""

from __future__ import annotations

import logging
import os
import statistics
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from dataclasses import replace
from typing import Callable, Sequence

from ..codegen import render
from ..ir.ops import Operator
from ..ir.schedule import Schedule
from ..target import Target
from .build import Builder
from .result import BuilderProtocol, Candidate, MeasureResult, Rival, RunnerProtocol
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
        self._pool: ThreadPoolExecutor | None = None   # submit()'s, made on first use
        self._in_order = _InOrder(self.log, self._lock)
        self.anchors: dict[tuple, tuple[Rival, float]] = {}   # pair_with's, by operator
        if cache and self.log is not None:
            self.preload(self.log)

    def pair_with(self, op: Operator, rival: Rival | None, time_ms: float = 0.0) -> None:
        """Time every CPU kernel of ``op`` from now on in turn with ``rival``, whose own time
        is ``time_ms``, and record its times in those units: its times over the median of
        the rival's beside them, times ``time_ms``. A shared machine's speed changes from one
        stretch of milliseconds to the next: single measurements of one kernel spread by
        10-34% here, while its ratio to a copy of itself timed in turn held within 0.2%, so
        a search ranks its candidates by what they are rather than by when they ran. None:
        plain times again."""
        with self._lock:
            if rival:
                self.anchors[_identity(op)] = (rival, time_ms)
            else:
                self.anchors.pop(_identity(op), None)

    def pair_with_schedule(self, op: Operator, schedule: Schedule, name: str | None = None) -> float | None:
        """:meth:`pair_with` the kernel of ``schedule`` (named ``name``), its time the faster
        of two runs of it, since a fresh worker's first kernels run cold (an expert of 22 us,
        then 15). That time; None where it failed to build or run (nothing is paired)."""
        kernel = render(schedule, self.target, name=name)
        built = self.builder.build([kernel])[0]
        runs = [self.runner.run(op, kernel, built.path) for _ in range(2)] if built.ok else []
        if not runs or not all(r.ok for r in runs):
            return None
        time_ms = min(r.time_ms for r in runs)
        self.pair_with(op, Rival(kernel, built.path), time_ms)
        return time_ms

    def paired(self, op: Operator) -> bool:
        return _identity(op) in self.anchors

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

    def measure(self, items: Sequence[Schedule | Candidate],
                slow_cutoff_s: float | None = None) -> list[MeasureResult]:
        """One result per schedule (rendered for this target here) or candidate (a kernel
        written some other way), in order; all of one operator. A kernel whose check call
        and one more take longer than ``slow_cutoff_s`` is timed by those alone (a search passes
        a multiple of its own best: each search its own, though they share the runner)."""
        return self._measure(self._candidates(items), self._append, slow_cutoff_s)

    def submit(self, items: Sequence[Schedule | Candidate], slow_cutoff_s: float | None = None) -> Future:
        """``measure(items)`` in the background: a future of its results. Batches submitted
        one after another run side by side on a runner that has several devices (a Ray
        cluster's: each device takes the next kernel of any batch), one after another on
        the local Runner; their records reach the tuning log in submission order, as
        ``measure`` would write them. Rendering happens here, in the caller's thread."""
        cands = self._candidates(items)
        if self._pool is None:
            self._pool = ThreadPoolExecutor(4 if getattr(self.runner, "concurrent", False) else 1,
                                            thread_name_prefix="measure")
        ticket = self._in_order.ticket()

        def work() -> list[MeasureResult]:
            try:
                return self._measure(cands, lambda record: self._in_order.append(ticket, record), slow_cutoff_s)
            finally:
                self._in_order.done(ticket)

        return self._pool.submit(work)

    def _append(self, record: TuningRecord) -> None:
        if self.log is not None:
            with self._lock:
                self.log.append(record)

    def _candidates(self, items: Sequence[Schedule | Candidate]) -> list[Candidate]:
        return [c if isinstance(c, Candidate) else Candidate.of(c, self.target) for c in items]

    def _measure(self, cands: list[Candidate], append: Callable[[TuningRecord], None],
                 slow_cutoff_s: float | None) -> list[MeasureResult]:
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
        anchor = self.anchors.get(_identity(op)) if self.target.kind == "cpu" else None
        rival = anchor[0] if anchor else None
        runs = self.runner.run_many(op, [(c.kernel, b.path) for c, b in zip(todo.values(), builds)
                                         if b.path is not None],
                                    slow_cutoff_s=slow_cutoff_s, rival=rival)   # ...then timing, alone
        for (mk, c), b in zip(todo.items(), builds):
            if b.path is None:
                res = MeasureResult.failure(b.error or "build failed", build_s=b.build_s)
            else:
                res = self._in_anchor_units(op, next(runs), anchor)
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
            append(self.record(c, res))
        return [results[mk] for mk in mkeys]

    @staticmethod
    def _in_anchor_units(op, res: MeasureResult, anchor: tuple[Rival, float] | None) -> MeasureResult:
        if not (anchor and res.ok and res.rival_times_ms):   # unpaired, or timed by its check call
            return res
        # each pair's ratio, in the rival's units, and their median (as the final comparison
        # takes): over 100 measurements of the expert of a strided convolution against itself,
        # 10 pairs each, 5 fell more than 3% from 1 where a ratio of the two medians had 12
        times = tuple(anchor[1] * k / r for k, r in zip(res.times_ms, res.rival_times_ms))
        time_ms = statistics.median(times)
        return replace(res, time_ms=time_ms, times_ms=times, gflops=op.flops / time_ms / 1e6)

    def measure_one(self, item: Schedule | Candidate, slow_cutoff_s: float | None = None) -> MeasureResult:
        return self.measure([item], slow_cutoff_s)[0]

    def record(self, c: Candidate, res: MeasureResult) -> TuningRecord:
        t = self.target
        return TuningRecord(op=c.op.kind, shape=c.op.shape_str, target=t.kind, hardware=t.device,
                            compiler=t.compiler, schedule=c.schedule,
                            time_ms=res.time_ms, times_ms=res.times_ms, gflops=res.gflops,
                            correct=res.correct, error=res.error, dtype=c.op.dtype)

    def close(self) -> None:
        if self._pool is not None:
            self._pool.shutdown(wait=True, cancel_futures=True)
        self.runner.close()

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()


class _InOrder:
    """Appends submitted batches' records to a tuning log in submission order: a batch's
    records wait while an earlier batch is still measuring, then go in behind it."""

    def __init__(self, log: TuningLog | None, lock: threading.Lock):
        self.log = log
        self._lock = lock                      # the measurer's: one writer of the log at a time
        self._issued = 0                       # tickets given out
        self._head = 0                         # the batch whose records go straight in
        self._waiting: dict[int, list[TuningRecord]] = {}
        self._done: set[int] = set()

    def ticket(self) -> int:
        with self._lock:
            self._issued += 1
            return self._issued - 1

    def append(self, ticket: int, record: TuningRecord) -> None:
        with self._lock:
            if ticket == self._head:
                if self.log is not None:
                    self.log.append(record)
            else:
                self._waiting.setdefault(ticket, []).append(record)

    def done(self, ticket: int) -> None:
        with self._lock:
            self._done.add(ticket)
            while self._head in self._done:
                self._done.remove(self._head)
                self._head += 1
                for record in self._waiting.pop(self._head, []):
                    if self.log is not None:
                        self.log.append(record)


def _identity(op: Operator) -> tuple:
    return op.kind, op.shape, op.dtype
