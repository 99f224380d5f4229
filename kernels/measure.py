"""Compile kernels and time them on this machine, isolated from the caller.

Generated kernels can crash, hang or compute garbage, so each one runs in a worker
process that can be killed and replaced; every failure comes back as a failed
MeasureResult, never as an exception. Compiles run in parallel, but never beside
timing: ``Measurer.measure`` builds a whole batch first, then runs it one kernel at
a time.

CUDA kernels (``Kernel.launch`` set) are compiled by NVRTC inside the worker, on the
GPU they run on (:mod:`kernels.cuda_runner`): the Builder only stores their source,
and the NVRTC time comes back as the result's ``build_s``. A CUDA error can poison
the worker's context, so the worker is replaced after one.
"""

from __future__ import annotations

import ctypes
import hashlib
import json
import logging
import math
import os
import re
import select
import statistics
import subprocess
import sys
import tempfile
import threading
import time
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, replace
from pathlib import Path
from typing import Any, Iterator

import numpy as np

from .kernel import Kernel
from .library import library_call
from .ops import Operator, make_op
from .target import CC, CFLAGS, Target, cpu_target
from .tuning_log import MeasureKey, TuningLog, TuningRecord, measure_key, parse_schedule_key

logger = logging.getLogger(__name__)

# Kernels sum fp32 products in a different order than the float64 reference, so
# results differ by rounding that grows with the reduction length; normalising the
# error by the largest output keeps near-zero outputs from failing a correct kernel,
# while a wrong index or a missed tile still gives errors of order 1.
RTOL = 1e-4


# ---------------------------------------------------------------- results

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

    @classmethod
    def failure(cls, error: str, correct: bool = False, build_s: float = 0.0,
                run_s: float = 0.0) -> "MeasureResult":
        return cls(False, math.inf, (), 0.0, correct, error, build_s, run_s)

    @classmethod
    def from_record(cls, r: TuningRecord) -> "MeasureResult":
        """A result recalled from a tuning log (nothing was spent on it now)."""
        ok = r.correct and r.error is None and math.isfinite(r.time_ms)
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


# ---------------------------------------------------------------- building

def default_cache_dir() -> Path:
    """``$SCHEDGYM_CACHE/build``, else ``~/.cache/schedgym/build``, else a per-user temp dir."""
    root = os.environ.get("SCHEDGYM_CACHE")
    candidates = [Path(root)] if root else []
    candidates.append(Path.home() / ".cache" / "schedgym")
    candidates.append(Path(tempfile.gettempdir()) / f"schedgym-{os.getuid()}")
    for c in candidates:
        try:
            (c / "build").mkdir(parents=True, exist_ok=True)
            if os.access(c / "build", os.W_OK):
                return c / "build"
        except OSError:
            continue
    raise OSError("no writable directory for compiled kernels; set SCHEDGYM_CACHE")


def _short_compile_error(stderr: str, src: Path) -> str:
    """The first error line, with the cache path shortened; the rest goes to debug log."""
    lines = stderr.replace(str(src), "kernel.c").splitlines()
    errors = [line for line in lines if "error" in line] or lines or ["compiler failed"]
    return "compile error: " + errors[0].strip()[:300]


class Builder:
    """Compiles kernel sources to shared objects, in parallel, each under a timeout.

    Objects are cached on disk by source digest and toolchain (compiler, flags and
    CPU, because of ``-march=native``), so the same source is compiled only once.
    """

    def __init__(self, workers: int | None = None, timeout_s: float = 60.0,
                 cache_dir: str | os.PathLike | None = None, cc: str = CC,
                 cflags: tuple[str, ...] = CFLAGS):
        self.workers = workers or len(os.sched_getaffinity(0)) or 1
        self.timeout_s = timeout_s
        self.cache_dir = (Path(cache_dir) if cache_dir is not None else default_cache_dir()).resolve()
        self.cache_dir.mkdir(parents=True, exist_ok=True)
        self.cc, self.cflags = cc, tuple(cflags)
        t = cpu_target()
        toolchain = json.dumps([cc, t.compiler, self.cflags, t.device])
        self._toolchain = hashlib.sha256(toolchain.encode()).hexdigest()[:10]
        self._lock = threading.Lock()
        self.compiles = 0             # compiler invocations so far (cache hits excluded)

    def path_for(self, kernel: Kernel) -> Path:
        return self.cache_dir / f"{kernel.digest}-{self._toolchain}.so"

    def build(self, kernels: list[Kernel]) -> list[BuildResult]:
        """One BuildResult per kernel, in order; equal sources are compiled once."""
        unique = {k.digest: k for k in kernels}
        if len(unique) <= 1 or self.workers == 1:
            done = {d: self._build_one(k) for d, k in unique.items()}
        else:
            with ThreadPoolExecutor(min(self.workers, len(unique))) as pool:
                done = dict(zip(unique, pool.map(self._build_one, unique.values())))
        return [done[k.digest] for k in kernels]

    def _build_one(self, kernel: Kernel) -> BuildResult:
        if kernel.is_cuda:
            return self._store_cuda(kernel)
        so = self.path_for(kernel)
        if so.exists():
            return BuildResult(str(so), None, 0.0, cached=True)
        t0 = time.perf_counter()
        tag = f"{os.getpid()}-{threading.get_ident()}"
        src = so.with_suffix(".c")
        tmp_src = so.with_name(f"{so.stem}.{tag}.tmp.c")
        tmp_so = so.with_name(f"{so.stem}.{tag}.tmp.so")
        with self._lock:
            self.compiles += 1
        try:
            tmp_src.write_text(kernel.source)
            os.replace(tmp_src, src)  # kept beside the object, for reading
            cmd = [self.cc, *self.cflags, str(src), "-o", str(tmp_so)]
            try:
                proc = subprocess.run(cmd, capture_output=True, text=True, timeout=self.timeout_s)
            except subprocess.TimeoutExpired:
                return BuildResult(None, f"compile timeout after {self.timeout_s:g}s",
                                   time.perf_counter() - t0)
            except OSError as e:
                return BuildResult(None, f"compile error: cannot run {self.cc}: {e}",
                                   time.perf_counter() - t0)
            if proc.returncode != 0:
                logger.debug("compile of %s failed:\n%s", kernel.name, proc.stderr)
                return BuildResult(None, _short_compile_error(proc.stderr, src),
                                   time.perf_counter() - t0)
            os.replace(tmp_so, so)  # atomic: a concurrent reader never sees half a file
            return BuildResult(str(so), None, time.perf_counter() - t0)
        finally:
            for p in (tmp_src, tmp_so):
                p.unlink(missing_ok=True)


    def _store_cuda(self, kernel: Kernel) -> BuildResult:
        """CUDA source is compiled by NVRTC where it runs; here it is only written down."""
        cu = self.cache_dir / f"{kernel.digest}.cu"
        if cu.exists():
            return BuildResult(str(cu), None, 0.0, cached=True)
        tmp = cu.with_name(f"{cu.stem}.{os.getpid()}-{threading.get_ident()}.tmp.cu")
        try:
            tmp.write_text(kernel.source)
            os.replace(tmp, cu)
        except OSError as e:
            tmp.unlink(missing_ok=True)
            return BuildResult(None, f"cannot write kernel source: {e}", 0.0)
        return BuildResult(str(cu), None, 0.0)


# ---------------------------------------------------------------- the worker process

def _rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out-ref| / max(max|ref|, 1e-6); inf when anything is NaN or infinite."""
    if not np.all(np.isfinite(out)):
        return math.inf
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    return float(diff.max(initial=0.0) / max(float(np.abs(ref).max(initial=0.0)), 1e-6))


MASTER_STACK = 64 << 20   # bytes of stack for the thread that calls kernels


def _stack_bytes(size: str) -> int:
    """Bytes in an OMP_STACKSIZE value such as ``16M`` (no suffix means KiB); 0 if unreadable."""
    m = re.fullmatch(r"\s*(\d+)\s*([bkmgBKMG]?)\s*", size)
    if not m:
        return 0
    return int(m.group(1)) << {"b": 0, "k": 10, "": 10, "m": 20, "g": 30}[m.group(2).lower()]


def _watch_parent() -> None:
    """Exit when the parent dies, even while a kernel loops forever (ctypes drops the GIL)."""
    parent = os.getppid()
    while True:
        time.sleep(1.0)
        if os.getppid() != parent:
            os._exit(3)


def _worker_main() -> None:
    """Serve run requests, one JSON line each, from stdin until it closes."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)            # whatever a kernel prints must not corrupt the protocol
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, daemon=True).start()

    def send(**msg: Any) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    def serve_all() -> None:
        data: dict[tuple[str, str, int], tuple[Operator, dict[str, np.ndarray], np.ndarray]] = {}
        send(event="ready")
        for line in sys.stdin:
            try:
                _serve(json.loads(line), data, send)
            except Exception as e:  # a broken request must not take the worker down
                send(event="error", error=f"worker error: {type(e).__name__}: {e}")

    # The calling thread becomes OpenMP's master thread, which OMP_STACKSIZE does not
    # cover; give it a stack at least as large as the other threads get.
    threading.stack_size(max(_stack_bytes(os.environ.get("OMP_STACKSIZE", "")), MASTER_STACK))
    server = threading.Thread(target=serve_all, name="kernel-runner")
    server.start()
    server.join()


def _serve(req: dict, data: dict, send: Any) -> None:
    if req.get("backend") == "cuda":
        from .cuda_runner import serve_cuda  # CuPy is imported by GPU workers only
        serve_cuda(req, send)
        return
    key = (req["kind"], req["shape"], req["seed"])
    if key not in data:  # inputs and reference once per operator, not per kernel
        op = make_op(req["kind"], req["shape"])
        inputs = op.random_inputs(np.random.default_rng(req["seed"]))
        data[key] = (op, inputs, op.reference(inputs))
    op, inputs, ref = data[key]
    try:
        fn = getattr(ctypes.CDLL(req["path"]), req["name"])
    except (OSError, AttributeError) as e:
        send(event="error", error=f"load error: {e}")
        return
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * len(req["args"])
    out_name = op.output.name
    # Fresh copies each time: a kernel that scribbles on its inputs must not spoil the next.
    arrays = [np.full(op.output.shape, np.nan, np.float32) if name == out_name
              else np.array(inputs[name], dtype=np.float32, order="C", copy=True)
              for name in req["args"]]
    out = arrays[req["args"].index(out_name)]
    ptrs = [a.ctypes.data for a in arrays]
    send(event="prepared")

    t0 = time.perf_counter()
    fn(*ptrs)
    check_s = time.perf_counter() - t0
    err = _rel_error(out, ref)
    if not err <= req["rtol"]:
        what = "NaN or inf in output" if math.isinf(err) else f"max rel err {err:.1e}"
        send(event="checked", correct=False, error=f"wrong result: {what}")
        return
    for name, a in zip(req["args"], arrays):
        if name != out_name and not np.array_equal(a, inputs[name]):
            send(event="checked", correct=False, error=f"wrong result: kernel wrote to input {name}")
            return
    send(event="checked", correct=True, error=None)
    if req.get("slow_cutoff_s") and check_s > req["slow_cutoff_s"]:
        send(event="timed", times=[check_s], library_times=[])  # hopeless: the check call is its time
        return

    # The check call already warmed caches; a slow kernel gets no further warm-up.
    if check_s < req["min_time_s"] / 10:
        for _ in range(req["warmup"]):
            fn(*ptrs)
    # at least 3 calls, but a call slower than the whole budget is not repeated much
    least = min(3 if check_s < req["min_time_s"] else 1, req["repeats"])
    if req.get("library"):
        times, lib_times = _time_against_library(fn, ptrs, library_call(op, inputs), least, req)
    else:
        times, lib_times = _time_calls(lambda: fn(*ptrs), least, req["repeats"], req["min_time_s"]), []
    send(event="timed", times=times, library_times=lib_times)


def _time_calls(call, least: int, most: int, budget_s: float) -> list[float]:
    """Seconds per call: ``least`` to ``most`` calls, stopping once ``budget_s`` is spent."""
    times: list[float] = []
    while len(times) < most:
        t0 = time.perf_counter()
        call()
        times.append(time.perf_counter() - t0)
        if len(times) >= least and sum(times) >= budget_s:
            break
    return times


LIBRARY_BLOCKS = 4      # alternating blocks of library calls and kernel calls
SPIN_PAUSE_S = 0.15     # idle time between blocks


def _time_against_library(fn, ptrs, lib, least: int, req: dict) -> tuple[list[float], list[float]]:
    """Kernel and library timed in alternating blocks, so a machine whose speed drifts
    (shared hosts) slows both alike. Blocks, not single calls: after a call, OpenBLAS
    and OpenMP worker threads keep spinning for a while and would steal the cores of
    whichever runs next; a pause between blocks lets them go to sleep."""
    lib()
    times: list[float] = []
    lib_times: list[float] = []
    per_block = req["min_time_s"] / LIBRARY_BLOCKS
    for _ in range(LIBRARY_BLOCKS):
        time.sleep(SPIN_PAUSE_S)
        lib_times += _time_calls(lib, least, req["repeats"], per_block)
        time.sleep(SPIN_PAUSE_S)
        times += _time_calls(lambda: fn(*ptrs), least, req["repeats"], per_block)
    return times, lib_times


# ---------------------------------------------------------------- the runner

class _Worker:
    """A worker process and the line-based pipe to it."""

    def __init__(self, env: dict[str, str]):
        cmd = [sys.executable, "-c", f"from {__name__} import _worker_main; _worker_main()"]
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


class Runner:
    """Checks and times built kernels one at a time in a replaceable worker process.

    A kernel that crashes or outlives ``timeout_s`` (the check call plus timing) gets a
    failed result, and the next kernel a fresh worker. Timing makes between 3 and
    ``repeats`` calls, stopping once they add up to ``min_time_s``, so a slow kernel
    costs a few calls rather than minutes.
    """

    def __init__(self, timeout_s: float = 60.0, repeats: int = 10, warmup: int = 1,
                 min_time_s: float = 1.0, seed: int = 0, rtol: float = RTOL,
                 omp_stacksize: str = "16M", startup_timeout_s: float = 120.0):
        self.timeout_s, self.repeats, self.warmup = timeout_s, max(1, repeats), warmup
        self.min_time_s, self.seed, self.rtol = min_time_s, seed, rtol
        # A search sets this to a multiple of its best time: a kernel whose check call is
        # slower is timed by that one call instead of several (tinygrad stops early too).
        self.slow_cutoff_s: float | None = None
        self.omp_stacksize = omp_stacksize
        self.startup_timeout_s = startup_timeout_s   # also bounds preparing inputs
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

    def run_many(self, op: Operator, jobs: list[tuple[Kernel, str]],
                 library: bool = False) -> Iterator[MeasureResult]:
        """One result per (kernel, path), in order; here one at a time, lazily, so the
        caller records each before the next runs. A runner with several devices
        (:class:`kernels.cluster.RayRunner`) runs them side by side instead."""
        for kernel, path in jobs:
            yield self.run(op, kernel, path, library)

    def run(self, op: Operator, kernel: Kernel, path: str, library: bool = False) -> MeasureResult:
        """Check ``kernel`` (built at ``path``) against the reference and time it; with
        ``library``, time the vendor library too, in alternating blocks."""
        self.runs += 1
        t0 = time.perf_counter()
        try:
            result = self._run(op, kernel, path, library)
        except BaseException:
            self._drop_worker()  # never leave a worker spinning on a kernel
            raise
        return replace(result, run_s=time.perf_counter() - t0 - result.build_s)

    def _run(self, op: Operator, kernel: Kernel, path: str, library: bool) -> MeasureResult:
        try:
            w = self._ensure_worker()
        except (RuntimeError, OSError) as e:
            logger.warning("%s", e)
            return MeasureResult.failure(str(e))
        req = dict(path=path, name=kernel.name, args=[t.name for t in kernel.args],
                   kind=op.kind, shape=op.shape_str, seed=self.seed, rtol=self.rtol,
                   repeats=self.repeats, warmup=self.warmup, min_time_s=self.min_time_s,
                   slow_cutoff_s=None if library else self.slow_cutoff_s,
                   library=library)
        if kernel.is_cuda:
            req.update(backend="cuda", launch=kernel.launch)
        correct = False
        build_s = 0.0  # NVRTC, for CUDA kernels
        # Before "prepared", a CPU worker may compute a large reference (startup_timeout_s
        # bounds it); a GPU worker compiles the kernel then, which timeout_s bounds.
        limit = self.timeout_s if kernel.is_cuda else max(self.timeout_s, self.startup_timeout_s)
        deadline = time.monotonic() + limit
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
                if event == "prepared":
                    limit = self.timeout_s
                    deadline = time.monotonic() + limit
                elif event == "checked":
                    if not msg["correct"]:
                        self._drop_worker()  # a kernel that wrote garbage may have written it anywhere
                        return MeasureResult.failure(msg["error"], build_s=build_s)
                    correct = True
                elif event == "timed":
                    times = tuple(t * 1e3 for t in msg["times"])
                    median = statistics.median(times)
                    gflops = op.flops / max(median / 1e3, 1e-12) / 1e9
                    return MeasureResult(True, median, times, gflops, True, None, build_s=build_s,
                                         library_times_ms=tuple(t * 1e3 for t in msg["library_times"]))
        except TimeoutError:
            self._drop_worker()
            return MeasureResult.failure(f"timeout after {limit:g}s", correct=correct, build_s=build_s)
        except (BrokenPipeError, OSError):
            reason = w.death()
            self._drop_worker()
            return MeasureResult.failure(reason, correct=correct, build_s=build_s)


# ---------------------------------------------------------------- the measurer

class Measurer:
    """Measures schedules of an operator, each distinct schedule once.

    Results are cached by (op kind, shape, schedule key, target kind, device,
    compiler); with a tuning log, the cache starts from the log's records and every
    new measurement is appended to it. The builder/runner pair decides where kernels
    compile and run: :class:`Builder`/:class:`Runner` on this machine, or
    :func:`kernels.cluster.backend` on a Ray cluster. Several threads may measure at
    once (envs stepping in parallel); cache and log are updated under a lock.
    """

    def __init__(self, target: Target, builder: Builder | None = None,
                 runner: Runner | None = None, log: TuningLog | str | os.PathLike | None = None,
                 cache: bool = True):
        self.target = target
        self.builder = builder or Builder()
        # GPU kernels run in milliseconds: one that takes 30 s to compile and run is hopeless
        self.runner = runner or Runner(timeout_s=30.0 if target.kind == "cuda" else 60.0)
        self.log = log if isinstance(log, TuningLog) or log is None else TuningLog(log)
        self.use_cache = cache
        self.cache: dict[MeasureKey, MeasureResult] = {}
        self.measured = 0         # new measurements made (cache misses)
        self.build_s = 0.0        # seconds spent compiling, over all of them
        self.run_s = 0.0          # seconds spent checking and timing, over all of them
        self._lock = threading.Lock()
        if cache and self.log is not None:
            self.preload(self.log)

    def preload(self, log: TuningLog) -> int:
        """Fill the cache from ``log``; returns how many records were taken."""
        n = 0
        for r in log:
            self.cache[r.key] = MeasureResult.from_record(r)
            n += 1
        return n

    def key(self, op: Operator, key: str) -> MeasureKey:
        t = self.target
        return measure_key(op.kind, op.shape, parse_schedule_key(key), t.kind, t.device, t.compiler)

    def measure(self, op: Operator, kernels: list[Kernel], keys: list[str]) -> list[MeasureResult]:
        """One result per kernel; ``keys[i]`` identifies the schedule of ``kernels[i]``."""
        if len(kernels) != len(keys):
            raise ValueError(f"{len(kernels)} kernels but {len(keys)} keys")
        mkeys = [self.key(op, k) for k in keys]
        results: dict[MeasureKey, MeasureResult] = {}
        todo: dict[MeasureKey, tuple[Kernel, str]] = {}
        with self._lock:
            for mk, kernel, key in zip(mkeys, kernels, keys):
                if self.use_cache and mk in self.cache:
                    results[mk] = self.cache[mk]
                elif mk not in todo:    # duplicates in a batch are measured once
                    todo[mk] = (kernel, key)

        builds = self.builder.build([k for k, _ in todo.values()])   # all compiles first...
        runs = self.runner.run_many(op, [(kernel, b.path) for (kernel, _), b in zip(todo.values(), builds)
                                         if b.path is not None])     # ...then timing, alone
        for (mk, (kernel, key)), b in zip(todo.items(), builds):
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
                if self.use_cache:
                    self.cache[mk] = res
                if self.log is not None:
                    self.log.append(self.record(op, key, res))
        return [results[mk] for mk in mkeys]

    def measure_one(self, op: Operator, kernel: Kernel, key: str) -> MeasureResult:
        return self.measure(op, [kernel], [key])[0]

    def record(self, op: Operator, key: str, res: MeasureResult) -> TuningRecord:
        t = self.target
        return TuningRecord(op=op.kind, shape=op.shape_str, target=t.kind, hardware=t.device,
                            compiler=t.compiler, schedule=parse_schedule_key(key),
                            time_ms=res.time_ms, times_ms=res.times_ms, gflops=res.gflops,
                            correct=res.correct, error=res.error)

    def close(self) -> None:
        self.runner.close()

    def __enter__(self) -> "Measurer":
        return self

    def __exit__(self, *exc: object) -> None:
        self.close()
