"""The GPU half of the measurement worker: NVRTC compile, check, time with CUDA events.

Imported only inside a worker process (:mod:`kernels.measure.worker`), so the tuner itself
never touches CUDA: a kernel that faults (illegal address, launch failure) leaves
the CUDA context unusable, and the worker reports a *fatal* error that makes the
runner replace it. A hang is the runner's timeout, as on the CPU.

The reference is computed with numpy on the CPU once per operator, as on the CPU;
inputs are copied to the GPU once per operator, each between canary margins, as is
each kernel's output. The check is the CPU worker's: the first launch, then one timed
sample drawn at random, run on a NaN-filled output and compared bit for bit with the
first launch's output (our kernels reduce each element in one thread, in a fixed
order, so a difference is a race or a kernel that keeps state between launches). The
library is cuBLAS for the matmul family (through CuPy in fp32, through torch in the
other dtypes) and cuDNN (through torch) for convolutions, in the operator's dtype
(TF32 off but for tf32), timed with the same events, alternating call by call with
the kernel.
"""

from __future__ import annotations

import math
import os
import time
from pathlib import Path
from typing import Any, Callable

import numpy as np

from ..ir.ops import Operator, make_op
from ..codegen.rules import WGMMA_ARCH
from ..target import CUDA_SHARED_BYTES
from .check import Guarded, Tolerance, check_call, random_canary
from .library import CONV_KINDS, MATMUL_KINDS, einsum_call, matmul_call, torch_conv
from .timing import Rejected, VerifiedCall, time_calls

# CuPy adds -arch for the device it compiles on (sm_XX, or compute_XX where NVRTC is older)
NVRTC_OPTIONS: tuple[str, ...] = ("--std=c++17",)
SAMPLE_S = 2e-3  # a timing sample launches back to back until it lasts about this long

_data: dict[tuple, tuple[Operator, dict[str, np.ndarray], np.ndarray, dict[str, Guarded]]] = {}
_host: dict[tuple, tuple[Operator, dict[str, np.ndarray], np.ndarray]] = {}
HOST_OPERATORS = 32
_rng = np.random.default_rng()   # OS entropy: the verified sample and the canary


def _cupy() -> Any:
    """CuPy, imported with fp32 cuBLAS without TF32 and a compile cache in memory only
    (so NVRTC time is measured and no disk cache grows): it reads both when imported."""
    os.environ.setdefault("CUPY_TF32", "0")
    os.environ.setdefault("CUPY_CACHE_IN_MEMORY", "1")
    import cupy
    return cupy


def _operator(req: dict) -> tuple[Operator, dict[str, np.ndarray], np.ndarray, dict[str, Guarded]]:
    """Operator, host inputs, reference and guarded device inputs. Device memory holds one
    operator at a time; the host keeps the inputs and references of the last few, since
    a search over several operators (a model's tasks) comes back to each in turn and a
    convolution's reference takes seconds."""
    cp = _cupy()
    key = (req["kind"], req["shape"], req.get("dtype", "fp32"), req["seed"])
    if key not in _data:
        _data.clear()  # frees the previous operator's device memory
        if key not in _host:
            op = make_op(req["kind"], req["shape"], req.get("dtype", "fp32"))
            inputs = op.random_inputs(np.random.default_rng(req["seed"]))
            _host[key] = (op, inputs, op.reference(inputs))
            while len(_host) > HOST_OPERATORS:
                _host.pop(next(iter(_host)))
        op, inputs, ref = _host[key]
        canary = random_canary(_rng, op.dtype)
        dev = {n: Guarded.alloc(cp, a.shape, canary, cp.asarray(a), op.dtype) for n, a in inputs.items()}
        _data[key] = (op, inputs, ref, dev)
    return _data[key]


def compile_kernel(source: str, name: str, shared_bytes: int = 0) -> Any:
    """The kernel compiled by NVRTC for this GPU (raises CuPy's CompileException), allowed
    ``shared_bytes`` of dynamic shared memory (beyond 48 KiB a block must opt in); launch
    it with ``shared_mem=shared_bytes``."""
    cp = _cupy()
    options = NVRTC_OPTIONS
    if WGMMA_ARCH in source.split("\n", 1)[0]:   # wgmma: code for Hopper alone (sm_90a)
        options += (f"-arch={WGMMA_ARCH}",)
    fn = cp.RawModule(code=source, options=options).get_function(name)
    if shared_bytes > CUDA_SHARED_BYTES:
        fn.max_dynamic_shared_size_bytes = shared_bytes
    return fn


def _compile_error(e: Exception) -> str:
    lines = [line for line in str(e).splitlines() if "error" in line] or str(e).splitlines() or ["failed"]
    return "compile error: " + lines[0].strip()[:300]


TORCH_DTYPES = {"tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}


def _torch_tensor(a: Any, dtype: str) -> Any:
    """A torch view of CuPy array ``a`` stored in ``dtype`` (bf16 bits reinterpreted)."""
    import torch
    if dtype == "bf16":   # as int16, a type every torch takes from CuPy
        return torch.as_tensor(a.view(_cupy().int16), device="cuda").view(torch.bfloat16)
    return torch.as_tensor(a, device="cuda")   # shares CuPy's memory


def _torch_matmul(op: Operator, dev: dict[str, Any]) -> Callable[[], object]:
    """cuBLAS through torch in the operator's dtype (CuPy has no bf16): what a user gets
    from ``torch.matmul`` in bf16/fp16, or in fp32 with TF32 on."""
    import torch
    a, b = _torch_tensor(dev["A"], op.dtype), _torch_tensor(dev["B"], op.dtype)
    out = torch.empty(op.output.shape, dtype=a.dtype, device="cuda")
    if op.kind != "dense_bias_relu":
        return lambda: torch.matmul(a, b, out=out)
    bias = _torch_tensor(dev["bias"], op.dtype)

    def dense():
        torch.matmul(a, b, out=out)
        out.add_(bias).relu_()
    return dense


def library_call(op: Operator, dev: dict[str, Any]) -> Callable[[], object]:
    """cuBLAS for the matmul family (CuPy in fp32 with TF32 off; torch in the other dtypes),
    cuDNN (torch) for convolutions, in the operator's dtype (TF32 on only for tf32); CuPy's
    einsum for a contraction added since, in fp32 (``library.library_name``)."""
    if op.dtype != "fp32" or op.kind in CONV_KINDS:
        import torch

        torch.backends.cuda.matmul.allow_tf32 = op.dtype == "tf32"
        torch.backends.cudnn.allow_tf32 = op.dtype == "tf32"
        torch.set_grad_enabled(False)
    if op.dtype != "fp32" and op.kind in MATMUL_KINDS:
        return _torch_matmul(op, dev)
    if op.kind not in CONV_KINDS and op.dtype == "fp32":
        call = matmul_call(op, dev, _cupy()) or einsum_call(op, dev, _cupy())
        if call is not None:
            return call
    if op.kind in CONV_KINDS:
        import torch

        torch.backends.cudnn.benchmark = True  # the fastest cuDNN algorithm: a fair bar
        torch.set_grad_enabled(False)  # once, not per call: host overhead must not hide cuDNN's speed
        return torch_conv(op, {n: _torch_tensor(a, op.dtype) for n, a in dev.items()})  # CuPy's memory
    raise ValueError(f"no GPU library reference for {op.kind!r}")


class EventTimer:
    """Seconds per call of ``fn``, from CUDA events around ``n`` back-to-back calls.

    Everything runs on the legacy default stream (CuPy's and torch's default), so the
    events also bracket torch's kernels.
    """

    def __init__(self) -> None:
        self.cp = _cupy()
        self.start, self.end = self.cp.cuda.Event(), self.cp.cuda.Event()

    def __call__(self, fn: Callable[[], object], n: int = 1) -> float:
        self.start.record()
        for _ in range(n):
            fn()
        self.end.record()
        self.end.synchronize()
        return self.cp.cuda.get_elapsed_time(self.start, self.end) / 1e3 / n


def calls_per_sample(seconds: float) -> int:
    """How many back-to-back calls make one sample last about SAMPLE_S (launch overhead
    of a few microseconds would otherwise count against short kernels)."""
    return max(1, min(1000, math.ceil(SAMPLE_S / max(seconds, 1e-7))))


def serve_cuda(req: dict, send: Any) -> None:
    """Answer one run request for a CUDA kernel (the protocol of :mod:`kernels.measure.worker`)."""
    cp = _cupy()

    op, inputs, ref, dev = _operator(req)
    send(event="compiling")   # the inputs and reference are ready: a search bounds what follows
    t0 = time.perf_counter()
    try:
        fn = compile_kernel(Path(req["path"]).read_text(), req["name"], req.get("shared_bytes", 0))
    except cp.cuda.compiler.CompileException as e:
        send(event="error", error=_compile_error(e), build_s=time.perf_counter() - t0)
        return
    except cp.cuda.driver.CUDADriverError as e:   # more shared memory than the GPU grants
        send(event="error", error=f"launch setup: {str(e)[:200]}", build_s=time.perf_counter() - t0)
        return
    build_s = time.perf_counter() - t0
    out_name = op.output.name
    tol = Tolerance(req["atol"], req["rtol"])
    bufs = dict(dev)
    bufs[out_name] = Guarded.alloc(cp, op.output.shape, next(iter(dev.values())).canary, dtype=op.dtype)
    out = bufs[out_name].array
    args = tuple(bufs[name].array for name in req["args"])
    grid, block = (tuple(x) for x in req["launch"])

    shared_mem = req.get("shared_bytes", 0)

    def kernel() -> None:
        fn(grid, block, args, shared_mem=shared_mem)

    def check(call: str | None = None, first: np.ndarray | None = None) -> str | None:
        raws = {name: cp.asnumpy(g.raw) for name, g in bufs.items()}  # waits for the kernel
        return check_call(bufs, raws, out_name, ref, inputs, tol, call, first)

    send(event="prepared", build_s=build_s)
    try:
        timer = EventTimer()
        check_s = timer(kernel)
        error = check(None)
        first = cp.asnumpy(out)
    except Exception as e:  # CUDA errors: the context may be unusable now
        send(event="error", error=f"launch error: {type(e).__name__}: {str(e)[:200]}", fatal=True,
             build_s=build_s)
        return
    if error:
        _data.clear()  # a kernel may have scribbled on the device inputs or their margins
        send(event="checked", correct=False, error=error)
        return
    send(event="checked", correct=True, error=None)
    try:
        if req.get("slow_cutoff_s") and check_s > req["slow_cutoff_s"]:
            again_s = timer(kernel)   # hopeless if a second launch is slow too: a first one runs cold
            if again_s > req["slow_cutoff_s"]:
                send(event="timed", times=[min(check_s, again_s)], library_times=[])
                return
        lib = library_call(op, {n: g.array for n, g in dev.items()}) if req.get("library") else None
        for _ in range(max(1, req["warmup"])):
            kernel()
        n = calls_per_sample(timer(kernel))
        if lib is not None:
            lib()  # cuDNN's autotuning happens here
            n_lib = calls_per_sample(timer(lib))
        lib_times: list[float] = []
        # One sample (n launches) drawn at random runs on a NaN-filled output (the fill is
        # queued before the sample's start event) and is checked after its end event.
        verified = VerifiedCall(int(_rng.integers(req["repeats"])), bufs[out_name].fill_nan,
                                lambda call: check(call, first))
        kernel_clock = verified.clock(lambda fn: timer(fn, n))

        def clock(fn: Callable[[], object]) -> float:
            """A sample of ``fn``, after one of the library: the two alternate."""
            if lib is not None:
                lib_times.append(timer(lib, n_lib))
            return kernel_clock(fn)

        least = min(3 if check_s < req["min_time_s"] else 1, req["repeats"])
        times = time_calls(kernel, least, req["repeats"], req["min_time_s"] / n, clock)
        verified.finish(kernel)
    except Rejected as e:
        _data.clear()
        send(event="checked", correct=False, error=str(e))
        return
    except Exception as e:
        send(event="error", error=f"launch error during timing: {type(e).__name__}: {str(e)[:200]}",
             fatal=True, build_s=build_s)
        return
    send(event="timed", times=times, library_times=lib_times)
