"""Check and time built kernels one at a time, each in a replaceable worker process.

Generated kernels can crash, hang or compute garbage, so each runs in a worker
process (:mod:`kernels.measure.worker`) that can be killed and replaced; every
failure comes back as a failed MeasureResult, never as an exception. A CUDA error
can poison the worker's context, so the worker is replaced after one.
"""

from __future__ import annotations

import json
import logging
import math
import os
import secrets
import select
import statistics
import subprocess
import sys
import time
from dataclasses import replace
from pathlib import Path
from typing import Iterator

from ..codegen.kernel import Kernel
from ..ir.ops import Operator
from .check import tolerance
from .result import MeasureResult, Rival

logger = logging.getLogger(__name__)


def available_memory() -> int:
    """Bytes of memory available to new work (``MemAvailable``), or all of it if unknown."""
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    return int(line.split()[1]) * 1024
    except OSError:
        pass
    return os.sysconf("SC_PAGE_SIZE") * os.sysconf("SC_PHYS_PAGES")


def check_fits_in_memory(op: Operator) -> None:
    """Raise a one-line ``ValueError`` when measuring ``op`` cannot fit in this machine's
    memory, before anything is compiled or written: the worker holds the inputs, a fresh
    copy of each per kernel, the output and a float64 reference (about 20 bytes an element)."""
    need = 20 * sum(math.prod(t.shape) for t in op.tensors)
    have = available_memory()
    if need > have:
        raise ValueError(f"{op.kind} {op.shape_str} needs about {need / 2**30:.1f} GiB of memory to measure "
                         f"(inputs, outputs and reference); {have / 2**30:.1f} GiB are available")


# The worker asks for real-time priority (SCHED_FIFO 1) first thing, before numpy or
# torch start their thread pools, so that every thread that runs a kernel or the library
# inherits it: a real-time thread preempts every normal process, whose share would
# otherwise bend timings by up to 50x (the scheduler's autogroups give a busy process of
# another session half the cores whatever its nice value, and threads asleep between
# blocks wake in 4 ms ticks behind it). The kernel's throttling of real-time tasks (5% of
# each second left to the rest) keeps a hung kernel from freezing the machine until the
# runner's timeout kills it. Where it is not allowed, the worker runs as before.
WORKER_PROGRAM = """
import os
if os.environ.get("SCHEDGYM_REALTIME") == "1":
    try:
        os.sched_setscheduler(0, os.SCHED_FIFO, os.sched_param(1))
    except OSError:
        pass
from kernels.measure.worker import main
main()
"""


class _Worker:
    """A worker process and the line-based pipe to it."""

    def __init__(self, env: dict[str, str]):
        cmd = [sys.executable, "-c", WORKER_PROGRAM]
        self.proc = subprocess.Popen(cmd, stdin=subprocess.PIPE, stdout=subprocess.PIPE, env=env)
        self._buf = b""

    def alive(self) -> bool:
        return self.proc.poll() is None

    def send(self, msg: dict) -> None:
        assert self.proc.stdin is not None
        self.proc.stdin.write((json.dumps(msg) + "\n").encode())
        self.proc.stdin.flush()

    def recv(self, deadline: float) -> dict | None:
        """Next message; None when the worker died; TimeoutError past ``deadline``."""
        assert self.proc.stdout is not None
        fd = self.proc.stdout.fileno()
        while b"\n" not in self._buf:
            left = deadline - time.monotonic()
            if left <= 0:
                raise TimeoutError
            ready, _, _ = select.select([fd], [], [], left)
            if ready:
                chunk = os.read(fd, 1 << 16)
                if not chunk:
                    return None
                self._buf += chunk
        line, self._buf = self._buf.split(b"\n", 1)
        return json.loads(line)

    def death(self) -> str:
        """Why the worker is gone, e.g. ``crashed (signal 11)``."""
        try:
            rc = self.proc.wait(timeout=10)
        except subprocess.TimeoutExpired:
            self.kill()
            return "crashed (worker hung after closing its pipe)"
        return f"crashed (signal {-rc})" if rc < 0 else f"crashed (exit code {rc})"

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
        self.proc.wait()
        for f in (self.proc.stdin, self.proc.stdout):
            if f is not None:
                try:
                    f.close()
                except OSError:
                    pass


SLOW_GRACE_S = 5.0   # with a slow cutoff, what checking and timing may take beyond 100 cutoffs
# With a slow cutoff (a search's candidate), what NVRTC may take for one kernel: the experts
# compile in at most 0.67 s (H200, BENCHMARKS); candidates that took 12 s (heavily unrolled)
# ran at 11-22 ms against the search's best 0.31 (matmul 3000x1000x2000).
SLOW_COMPILE_S = 5.0


class Runner:
    """Checks and times built kernels one at a time in a replaceable worker process.

    A kernel that crashes or outlives ``timeout_s`` (the check call plus timing) gets a
    failed result, and the next kernel a fresh worker. Timing makes between 3 and
    ``repeats`` calls, stopping once they add up to ``min_time_s``, so a slow kernel
    costs a few calls rather than minutes.

    Inputs are drawn from ``seed``; without one, a fresh seed per runner, so no kernel
    (and no search) can be tuned to one set of inputs. Outputs are checked against
    :func:`kernels.measure.check.tolerance` for the operator's dtype.
    """

    def __init__(self, timeout_s: float = 60.0, repeats: int = 10, warmup: int = 1,
                 min_time_s: float = 1.0, seed: int | None = None,
                 omp_stacksize: str = "16M", startup_timeout_s: float = 120.0, realtime: bool | None = None):
        self.timeout_s, self.repeats, self.warmup = timeout_s, max(1, repeats), warmup
        self.min_time_s = min_time_s
        self.seed = secrets.randbits(32) if seed is None else seed
        self.omp_stacksize = omp_stacksize
        self.startup_timeout_s = startup_timeout_s   # also bounds preparing inputs
        # time at real-time priority where allowed (WORKER_PROGRAM says why); SCHEDGYM_REALTIME=0 turns it off
        self.realtime = os.environ.get("SCHEDGYM_REALTIME", "1") != "0" if realtime is None else realtime
        self.realtime_denied = False
        self._worker: _Worker | None = None
        self.runs = 0             # kernels run so far
        self.workers_started = 0

    def _env(self) -> dict[str, str]:
        env = dict(os.environ)
        # Kernels keep local buffers on the stack of each OpenMP thread; libgomp reads
        # this when it loads, so it must be in the worker's environment from the start.
        env["OMP_STACKSIZE"] = self.omp_stacksize
        root = str(Path(__file__).resolve().parents[__name__.count(".")])
        env["PYTHONPATH"] = os.pathsep.join(p for p in (root, env.get("PYTHONPATH")) if p)
        env["PYTHONSAFEPATH"] = "1"  # import this package, not whatever the cwd holds
        env["SCHEDGYM_REALTIME"] = "1" if self.realtime else "0"
        return env

    def _ensure_worker(self) -> _Worker:
        if self._worker is not None and self._worker.alive():
            return self._worker
        self._drop_worker()
        w = _Worker(self._env())
        self.workers_started += 1
        try:
            msg = w.recv(time.monotonic() + self.startup_timeout_s)
        except TimeoutError:
            msg = None
        if msg is None or msg.get("event") != "ready":
            w.kill()
            raise RuntimeError("measurement worker failed to start")
        if self.realtime and not msg.get("realtime") and not self.realtime_denied:
            self.realtime_denied = True
            logger.warning("timing at normal priority (real-time priority is not allowed here): other "
                           "processes on this machine can bend the figures")
        self._worker = w
        return w

    def _drop_worker(self) -> None:
        if self._worker is not None:
            self._worker.kill()
            self._worker = None

    def close(self) -> None:
        self._drop_worker()

    def __enter__(self) -> "Runner":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()

    def __del__(self) -> None:
        try:
            self.close()
        except Exception:
            pass

    def run_many(self, op: Operator, jobs: list[tuple[Kernel, str]], library: bool = False,
                 slow_cutoff_s: float | None = None, rival: Rival | None = None) -> Iterator[MeasureResult]:
        """One result per (kernel, path), in order; here one at a time, lazily, so the
        caller records each before the next runs. A runner with several devices
        (:class:`kernels.cluster.RayRunner`) runs them side by side instead."""
        for kernel, path in jobs:
            yield self.run(op, kernel, path, library, slow_cutoff_s, rival)

    def run(self, op: Operator, kernel: Kernel, path: str, library: bool = False,
            slow_cutoff_s: float | None = None, rival: Rival | None = None) -> MeasureResult:
        """Check ``kernel`` (built at ``path``) against the reference and time it; with
        ``library``, time the vendor library too, in alternating blocks. A kernel whose
        check call and one more take longer than ``slow_cutoff_s`` (a search's multiple of
        its best) is timed by the faster of the two instead of several (tinygrad stops early
        too). A ``rival``
        is checked too, then timed in turn with ``kernel`` (``rival_times_ms``)."""
        if rival and kernel.is_cuda:
            raise ValueError("a rival is timed beside CPU kernels only: CUDA events time each launch on its own")
        self.runs += 1
        t0 = time.perf_counter()
        try:
            result = self._run(op, kernel, path, library, slow_cutoff_s, rival)
        except BaseException:
            self._drop_worker()  # never leave a worker spinning on a kernel
            raise
        return replace(result, run_s=time.perf_counter() - t0 - result.build_s)

    def _run(self, op: Operator, kernel: Kernel, path: str, library: bool,
             slow_cutoff_s: float | None, rival: Rival | None = None) -> MeasureResult:
        try:
            w = self._ensure_worker()
        except (RuntimeError, OSError) as e:
            logger.warning("%s", e)
            return MeasureResult.failure(str(e))
        tol = tolerance(op)
        req = dict(path=path, name=kernel.name, args=[t.name for t in kernel.args],
                   kind=op.kind, shape=op.shape_str, dtype=op.dtype, seed=self.seed, atol=tol.atol, rtol=tol.rtol,
                   repeats=self.repeats, warmup=self.warmup, min_time_s=self.min_time_s,
                   slow_cutoff_s=None if library else slow_cutoff_s,
                   library=library)
        if rival:
            req["rival"] = dict(path=rival.path, name=rival.kernel.name)
            req["pairs"] = rival.pairs or self.repeats
            req["min_time_s"] = rival.budget_s or self.min_time_s
        if kernel.is_cuda:
            req.update(backend="cuda", launch=kernel.launch, shared_bytes=kernel.shared_bytes)
        correct = False
        build_s = 0.0  # NVRTC, for CUDA kernels
        # Before "prepared", a CPU worker may compute a large reference (startup_timeout_s
        # bounds it); a GPU worker compiles the kernel then, which timeout_s bounds (from its
        # "compiling", SLOW_COMPILE_S for a search's candidate).
        limit = self.timeout_s if kernel.is_cuda else max(self.timeout_s, self.startup_timeout_s)
        deadline = time.monotonic() + limit
        compiling = False
        try:
            w.send(req)
            while True:
                msg = w.recv(deadline)
                if msg is None:
                    reason = w.death()
                    self._drop_worker()
                    return MeasureResult.failure(
                        reason.replace("crashed", "crashed during timing") if correct else reason,
                        correct=correct, build_s=build_s)
                event = msg["event"]
                build_s = msg.get("build_s", build_s)
                if event == "error":
                    if msg.get("fatal"):  # e.g. a CUDA error: the worker's context is unusable
                        self._drop_worker()
                    return MeasureResult.failure(msg["error"], build_s=build_s)
                if event == "compiling" and req["slow_cutoff_s"]:   # the inputs are ready
                    compiling = True
                    deadline = time.monotonic() + min(self.timeout_s, SLOW_COMPILE_S)
                    continue
                if event == "prepared":
                    compiling = False
                    limit = self.timeout_s
                    if req["slow_cutoff_s"]:   # a kernel far slower than the best is not waited for
                        limit = min(limit, SLOW_GRACE_S + 100 * req["slow_cutoff_s"])
                    deadline = time.monotonic() + limit
                elif event == "checked":  # the first call's check, or a failed timed call's
                    if not msg["correct"]:
                        # A kernel that wrote garbage, or out of bounds, may have written
                        # anywhere (the worker's heap too): the next kernel gets a fresh one.
                        self._drop_worker()
                        return MeasureResult.failure(msg["error"], build_s=build_s)
                    correct = True
                elif event == "timed":
                    times = tuple(t * 1e3 for t in msg["times"])
                    if not times or not all(0 < t < math.inf for t in times):
                        return MeasureResult.failure(f"impossible times {times}", build_s=build_s)
                    median = statistics.median(times)
                    gflops = op.flops / max(median / 1e3, 1e-12) / 1e9
                    return MeasureResult(True, median, times, gflops, True, None, build_s=build_s,
                                         library_times_ms=tuple(t * 1e3 for t in msg["library_times"]),
                                         rival_times_ms=tuple(t * 1e3 for t in msg.get("rival_times", ())))
        except TimeoutError:
            self._drop_worker()
            if compiling:
                return MeasureResult.failure(f"compile timeout: NVRTC ran past {SLOW_COMPILE_S:g}s (a search's "
                                             "limit)", build_s=SLOW_COMPILE_S)
            return MeasureResult.failure(f"timeout after {limit:.3g}s", correct=correct, build_s=build_s)
        except (BrokenPipeError, OSError):
            reason = w.death()
            self._drop_worker()
            return MeasureResult.failure(reason, correct=correct, build_s=build_s)
