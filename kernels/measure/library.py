"""The vendor library each operator is compared against, called on the same inputs.

The matmul family through numpy (BLAS) or cuBLAS, the convolutions through torch (oneDNN)
or cuDNN; an operator added since whose tensors are indexed by whole axes (a contraction
such as ``C[i, j] = A[i, k] * B[j, k]``) through einsum; any other has none (``None``),
and is tuned and reported without a library figure. torch is imported only when a
convolution asks for it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from ..ir.ops import Operator
from .timing import time_calls

SPIN_PAUSE_S = 0.15     # idle time after the library (between blocks, after a reference): OpenBLAS's
                        # threads spin for about 0.1 s after a call (measured: a kernel's first
                        # calls after a new shape's reference took 17 ms instead of 0.013)


MATMUL_KINDS = ("matmul", "batch_matmul", "dense_bias_relu")
CONV_KINDS = ("conv2d", "depthwise_conv2d", "conv2d_bias_relu")


def einsum_spec(op: Operator) -> str | None:
    """``op`` as an einsum (``"ik,jk->ij"``) where every tensor is indexed by whole axes
    and there is no epilogue; None otherwise (a window, a stride, a bias)."""
    if op.bias is not None:
        return None
    letters = {a.name: chr(ord("a") + i) for i, a in enumerate(op.axes)}

    def subscripts(access) -> str | None:
        out = ""
        for aff in access.index:
            if aff.const or len(aff.terms) != 1 or aff.terms[0][1] != 1:
                return None
            out += letters[aff.terms[0][0]]
        return out

    parts = [subscripts(a) for a in (op.lhs, op.rhs, op.out)]
    return None if None in parts else f"{parts[0]},{parts[1]}->{parts[2]}"


def library_name(op: Operator, target_kind: str = "cpu") -> str | None:
    """What ``op`` is compared against on this target; None where nothing is."""
    if op.kind in MATMUL_KINDS:
        return "cuBLAS" if target_kind == "cuda" else "numpy"
    if op.kind in CONV_KINDS:
        return "cuDNN" if target_kind == "cuda" else "torch"
    if einsum_spec(op) and (target_kind == "cpu" or op.dtype == "fp32"):
        return "CuPy einsum" if target_kind == "cuda" else "numpy einsum"
    return None


def matmul_call(op: Operator, arrays: dict, xp=np) -> Callable[[], object] | None:
    """The matmul family through array module ``xp`` (numpy, or CuPy for cuBLAS) into a
    preallocated output; None for other operators."""
    if op.kind not in MATMUL_KINDS:
        return None
    a, b = arrays["A"], arrays["B"]
    out = xp.empty(op.output.shape, xp.float32)
    if op.kind != "dense_bias_relu":
        return lambda: xp.matmul(a, b, out=out)
    bias = arrays["bias"]

    def dense():
        xp.matmul(a, b, out=out)
        xp.add(out, bias, out=out)
        xp.maximum(out, 0, out=out)
    return dense


def einsum_call(op: Operator, arrays: dict, xp=np) -> Callable[[], object] | None:
    """An operator added since, through ``xp.einsum``: numpy's into a preallocated output,
    its contraction optimised (through BLAS where it can); CuPy's (no ``out``) through
    cuTENSOR or cuBLAS where it can. None where it is no plain contraction
    (:func:`einsum_spec`)."""
    spec = einsum_spec(op)
    if spec is None:
        return None
    a, b = arrays[op.lhs.tensor], arrays[op.rhs.tensor]
    if xp is not np:
        return lambda: xp.einsum(spec, a, b)
    out = np.empty(op.output.shape, np.float32)
    return lambda: np.einsum(spec, a, b, out=out, optimize=True)


def torch_conv(op: Operator, tensors: dict) -> Callable[[], object]:
    """A convolution operator through torch (cuDNN on a GPU) on torch tensors, bias and
    ReLU included for ``conv2d_bias_relu``."""
    import torch
    stride, pad = op.params["stride"], op.params["pad"]
    x, w, b = tensors["I"], tensors["W"], tensors.get("bias")
    groups = x.shape[1] if op.kind == "depthwise_conv2d" else 1

    def conv():
        with torch.no_grad():
            y = torch.conv2d(x, w, b, stride, pad, 1, groups)
            return torch.relu_(y) if b is not None else y
    return conv


def library_call(op: Operator, inputs: dict[str, np.ndarray]) -> Callable[[], object]:
    """A no-argument call computing ``op`` with numpy (matmul family, contractions) or
    torch (convolutions); ValueError where ``library_name`` says there is none."""
    if op.kind in CONV_KINDS:
        import torch
        return torch_conv(op, {n: torch.from_numpy(a) for n, a in inputs.items()})
    call = matmul_call(op, inputs) or einsum_call(op, inputs)
    if call is None:
        raise ValueError(f"no library reference for {op.kind!r}")
    return call


def library_time_ms(op: Operator, inputs: dict[str, np.ndarray], repeats: int = 10,
                    min_time_s: float = 1.0) -> float:
    """Median ms of the library on ``inputs`` in this process: one warm-up, then 3 to
    ``repeats`` calls or until ``min_time_s`` is spent."""
    fn = library_call(op, inputs)
    fn()
    times = time_calls(fn, min(3, repeats), repeats, min_time_s)
    # its threads spin on and would hold the cores of whatever runs next: under a real-time
    # priority, tune's first searched kernel (paired with the expert) took 15 ms, not 0.02
    time.sleep(SPIN_PAUSE_S)
    return statistics.median(times) * 1e3
