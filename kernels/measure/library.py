"""The vendor library each operator is compared against, called on the same inputs.

torch is imported only when a convolution asks for it.
"""

from __future__ import annotations

import statistics
from typing import Callable

import numpy as np

from ..ir.ops import Operator
from .timing import time_calls


def library_name(op: Operator, target_kind: str = "cpu") -> str:
    if target_kind == "cuda":
        return "cuDNN" if "conv" in op.kind else "cuBLAS"
    return "torch" if "conv" in op.kind else "numpy"


def matmul_call(op: Operator, arrays: dict, xp=np) -> Callable[[], object] | None:
    """The matmul family through array module ``xp`` (numpy, or CuPy for cuBLAS) into a
    preallocated output; None for other operators."""
    if op.kind not in ("matmul", "batch_matmul", "dense_bias_relu"):
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
    """A no-argument call computing ``op`` with numpy (matmul family) or torch (convolutions)."""
    call = matmul_call(op, inputs)
    if call is not None:
        return call
    if "conv" in op.kind:
        import torch
        return torch_conv(op, {n: torch.from_numpy(a) for n, a in inputs.items()})
    raise ValueError(f"no library reference for {op.kind!r}")


def library_time_ms(op: Operator, inputs: dict[str, np.ndarray], repeats: int = 10,
                    min_time_s: float = 1.0) -> float:
    """Median ms of the library on ``inputs`` in this process: one warm-up, then 3 to
    ``repeats`` calls or until ``min_time_s`` is spent."""
    fn = library_call(op, inputs)
    fn()
    return statistics.median(time_calls(fn, min(3, repeats), repeats, min_time_s)) * 1e3
