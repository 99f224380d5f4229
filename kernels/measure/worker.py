"""The measurement worker: a process that loads, checks and times kernels.

It reads one JSON request a line from stdin and answers with events (``prepared``,
``checked``, ``timed`` or ``error``) on its own copy of stdout, so a kernel that
prints cannot corrupt the protocol. ``checked`` reports the first call's check, and
comes again, failed, when the timed call drawn for verification is wrong. The runner (:mod:`kernels.measure.runner`)
kills and replaces it when a kernel crashes or hangs. CUDA requests are served by
:mod:`kernels.measure.cuda_worker`, imported only in GPU workers.
"""

from __future__ import annotations

import ctypes
import json
import os
import re
import statistics
import sys
import threading
import time
from typing import Any, Callable

import numpy as np

from ..ir.ops import Operator, make_op
from .check import Guarded, Tolerance, check_call, random_canary
from .library import SPIN_PAUSE_S, library_call
from .timing import Rejected, VerifiedCall, time_calls, wall_clock


MASTER_STACK = 64 << 20   # bytes of stack for the thread that calls kernels
# Draws which timed call is verified and the canary: from the OS's entropy, not the
# inputs' seed, so nothing a kernel could learn predicts them.
_rng = np.random.default_rng()


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


def main() -> None:
    """Serve run requests, one JSON line each, from stdin until it closes."""
    proto = os.fdopen(os.dup(1), "w", buffering=1)
    os.dup2(2, 1)            # whatever a kernel prints must not corrupt the protocol
    sys.stdout = sys.stderr
    threading.Thread(target=_watch_parent, daemon=True).start()

    def send(**msg: Any) -> None:
        proto.write(json.dumps(msg) + "\n")
        proto.flush()

    realtime = os.sched_getscheduler(0) == os.SCHED_FIFO   # set before any import: runner.py says why

    def serve_all() -> None:
        data: dict[tuple[str, str, int], tuple[Operator, dict[str, np.ndarray], np.ndarray]] = {}
        send(event="ready", realtime=realtime)
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
        from .cuda_worker import serve_cuda  # CuPy is imported by GPU workers only
        serve_cuda(req, send)
        return
    key = (req["kind"], req["shape"], req.get("dtype", "fp32"), req["seed"])
    if key not in data:  # inputs and reference once per operator, not per kernel
        op = make_op(req["kind"], req["shape"], req.get("dtype", "fp32"))
        inputs = op.random_inputs(np.random.default_rng(req["seed"]))
        data[key] = (op, inputs, op.reference(inputs))
        time.sleep(SPIN_PAUSE_S)   # the reference's BLAS threads spin on, and would steal the kernel's cores
    op, inputs, ref = data[key]
    tol = Tolerance(req["atol"], req["rtol"])
    canary = random_canary(_rng)
    try:
        kernel = _Loaded(op, inputs, ref, tol, canary, req["path"], req["name"], req["args"])
        rival = req.get("rival") and _Loaded(op, inputs, ref, tol, canary, **req["rival"], args=req["args"],
                                             blame="the rival kernel is wrong: ")
    except (OSError, AttributeError) as e:
        send(event="error", error=f"load error: {e}")
        return
    send(event="prepared")

    check_s = wall_clock(kernel.call)
    error = kernel.check()
    if error:
        send(event="checked", correct=False, error=error)
        return
    send(event="checked", correct=True, error=None)
    if rival:
        rival_check_s = wall_clock(rival.call)
        error = rival.check()
        if error:   # the rival's fault, not the kernel's; it may have written anywhere: a fresh worker next
            send(event="error", error=error, fatal=True)
            return
    if req.get("slow_cutoff_s") and check_s > req["slow_cutoff_s"]:
        # hopeless if a second call is slow too: a first call runs cold (sleeping threads woken,
        # code and pages touched), 0.25 ms where the kernel takes 0.02
        again_s = wall_clock(kernel.call)
        if again_s > req["slow_cutoff_s"]:
            send(event="timed", times=[min(check_s, again_s)], library_times=[])
            return

    # The check call already warmed caches; a slow kernel gets no further warm-up.
    if check_s < req["min_time_s"] / 10:
        for _ in range(req["warmup"]):
            kernel.call()
    # at least 3 calls, but a call slower than the whole budget is not repeated much
    least = min(3 if check_s < req["min_time_s"] else 1, req["repeats"])
    most = req["repeats"] * (LIBRARY_BLOCKS if req.get("library") else 1)
    if rival:
        most = req["pairs"]
        block, rival_block = _block_calls(check_s), _block_calls(rival_check_s)
    verified = kernel.verified(most * block if rival else most)
    rival_times: list[float] = []
    try:
        if req.get("library"):
            times, lib_times = _time_against_library(kernel.call, library_call(op, inputs), least, check_s, req,
                                                     verified.clock())
        elif rival:
            rival_verified = rival.verified(most * rival_block)
            times, rival_times = _time_pairs((kernel.call, block, verified.clock()),
                                             (rival.call, rival_block, rival_verified.clock()),
                                             least, most, req["min_time_s"])
            rival_verified.finish(rival.call)
            lib_times = []
        else:
            times = time_calls(kernel.call, least, req["repeats"], req["min_time_s"], verified.clock())
            lib_times = []
        verified.finish(kernel.call)
    except Rejected as e:
        send(event="checked", correct=False, error=str(e))
        return
    send(event="timed", times=times, library_times=lib_times, rival_times=rival_times)


class _Loaded:
    """A built kernel loaded into this process with fresh copies of the inputs (a kernel
    that scribbles on its inputs must not spoil the next), each between canary margins,
    and an output that starts as NaN. ``blame`` opens each error it reports."""

    def __init__(self, op: Operator, inputs: dict, ref: np.ndarray, tol: Tolerance, canary: float,
                 path: str, name: str, args: list[str], blame: str = ""):
        fn = getattr(ctypes.CDLL(path), name)
        fn.restype = None
        fn.argtypes = [ctypes.c_void_p] * len(args)
        self.inputs, self.ref, self.tol, self.out_name = inputs, ref, tol, op.output.name
        self.bufs = {a: Guarded.alloc(np, op.tensor(a).shape, canary, inputs.get(a)) for a in args}
        self.raws = {a: g.raw for a, g in self.bufs.items()}   # host memory: checked in place
        ptrs = [self.bufs[a].array.ctypes.data for a in args]
        self.call = lambda: fn(*ptrs)
        self.first: np.ndarray | None = None
        self.blame = blame

    def check(self) -> str | None:
        """Why the output of the call just made is wrong, or None; the first correct
        output is what every later call must reproduce, bit for bit."""
        error = check_call(self.bufs, self.raws, self.out_name, self.ref, self.inputs, self.tol)
        if error is None:
            self.first = self.bufs[self.out_name].array.copy()
        return error and self.blame + error

    def verified(self, most: int) -> VerifiedCall:
        """One of the next ``most`` timed calls, drawn at random, checked."""
        out = self.bufs[self.out_name].array
        def verify(call: str) -> str | None:
            error = check_call(self.bufs, self.raws, self.out_name, self.ref, self.inputs, self.tol, call, self.first)
            return error and self.blame + error
        return VerifiedCall(int(_rng.integers(most)), lambda: out.fill(np.nan), verify)


LIBRARY_BLOCKS = 4      # alternating blocks of library calls and kernel calls
BLOCK_WARMUP_S = 0.005  # untimed calls opening each block after a pause (two at least): the first
                        # call after one took 150-196 us where the rest took 50 (batch_matmul
                        # 8x128x128x64), and the next ones stayed slower than back to back


def _time_against_library(call, lib, least: int, check_s: float, req: dict,
                          clock: Callable[[Callable[[], object]], float]) -> tuple[list[float], list[float]]:
    """Kernel and library timed in alternating blocks, so a machine whose speed drifts
    (shared hosts) slows both alike. Blocks, not single calls: after a call, OpenBLAS
    and OpenMP worker threads keep spinning for a while and would steal the cores of
    whichever runs next; a pause between blocks lets them go to sleep. After the pause
    the cores are cold (clocks, caches): a fast kernel's block opens with untimed calls
    for a few milliseconds, and so does the library's."""
    lib()
    times: list[float] = []
    lib_times: list[float] = []
    per_block = req["min_time_s"] / LIBRARY_BLOCKS
    warm = check_s < per_block / 10

    def warm_up(call) -> None:   # timed like any block, the samples dropped
        if warm:
            time_calls(call, 2, sys.maxsize, BLOCK_WARMUP_S)
    for _ in range(LIBRARY_BLOCKS):
        time.sleep(SPIN_PAUSE_S)
        warm_up(lib)
        lib_times += time_calls(lib, least, req["repeats"], per_block)
        time.sleep(SPIN_PAUSE_S)
        warm_up(call)
        times += time_calls(call, least, req["repeats"], per_block, clock)
    return times, lib_times


PAIR_BLOCK_S = 0.001   # a kernel's block of calls in a pair: about this long, its first call untimed


def _block_calls(call_s: float) -> int:
    """Calls in a kernel's block of a pair (a call of ``call_s`` seconds): one untimed and
    enough to fill ``PAIR_BLOCK_S``, at least two; a call that fills it alone, alone."""
    return 1 if call_s >= PAIR_BLOCK_S else 1 + max(2, min(64, round(PAIR_BLOCK_S / max(call_s, 1e-7))))


def _time_pairs(kernel: tuple, rival: tuple, least: int, most: int, budget_s: float) -> tuple[list[float], list[float]]:
    """A kernel and its rival timed in turn, a short block of calls each per pair (which
    goes first alternates): each ``(call, calls a block, clock)``; the median of each
    block, per pair. Both see the same moment of the machine: on a shared host, whose
    speed changes from one stretch of milliseconds to the next, the ratio within a pair
    holds where times taken apart do not (a kernel and its own copy: 0.999-1.002 of each
    other, where single measurements of one spread by 10-34%). Blocks, not single calls:
    each kernel then runs with its own data in the caches, as when it is timed alone;
    called by turns a call each, with separate copies of the inputs, one kernel took
    0.71-0.78 of another's time where, timed alone, it took 1.05 of it."""
    times: list[float] = []
    rival_times: list[float] = []
    t0 = time.perf_counter()
    while len(times) < most:
        for (call, calls, clock), out in ((kernel, times), (rival, rival_times))[::-1 if len(times) % 2 else 1]:
            samples = [clock(call) for _ in range(calls)]
            out.append(statistics.median(samples[1:]) if calls > 1 else samples[0])
        if len(times) >= least and time.perf_counter() - t0 >= budget_s:
            break
    return times, rival_times
