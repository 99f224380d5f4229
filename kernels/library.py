"""The vendor library each operator is compared against, called on the same inputs.

torch is imported only when a convolution asks for it.
"""

from __future__ import annotations

import statistics
import time
from typing import Callable

import numpy as np

from .ops import Operator


def library_name(op: Operator, target_kind: str = "cpu") -> str:
    if target_kind == "cuda":
        return "cuDNN" if "conv" in op.kind else "cuBLAS"
    return "torch" if "conv" in op.kind else "numpy"


def library_call(op: Operator, inputs: dict[str, np.ndarray]) -> Callable[[], object]:
    """A no-argument call computing ``op`` with numpy (matmul family) or torch (convolutions)."""
    if op.kind in ("matmul", "batch_matmul"):
        a, b = inputs["A"], inputs["B"]
        out = np.empty(op.output.shape, np.float32)
        return lambda: np.matmul(a, b, out=out)
    if op.kind == "dense_bias_relu":
        a, b, bias = inputs["A"], inputs["B"], inputs["bias"]
        out = np.empty(op.output.shape, np.float32)

        def dense():
            np.matmul(a, b, out=out)
            np.add(out, bias, out=out)
            np.maximum(out, 0, out=out)
        return dense
    if op.kind in ("conv2d", "depthwise_conv2d"):
        import torch
        stride, pad = op.params["stride"], op.params["pad"]
        x, w = torch.from_numpy(inputs["I"]), torch.from_numpy(inputs["W"])
        groups = x.shape[1] if op.kind == "depthwise_conv2d" else 1

        def conv():
            with torch.no_grad():
                return torch.nn.functional.conv2d(x, w, stride=stride, padding=pad, groups=groups)
        return conv
    raise ValueError(f"no library reference for {op.kind!r}")


def time_call(fn: Callable[[], object], repeats: int = 10, min_time_s: float = 1.0) -> list[float]:
    """Seconds per call: one warm-up, then 3..repeats calls or until ``min_time_s`` is spent."""
    fn()
    times: list[float] = []
    while len(times) < 3 or (len(times) < repeats and sum(times) < min_time_s):
        t0 = time.perf_counter()
        fn()
        times.append(time.perf_counter() - t0)
    return times


def library_time_ms(op: Operator, inputs: dict[str, np.ndarray], **kw) -> float:
    return statistics.median(time_call(library_call(op, inputs), **kw)) * 1e3
