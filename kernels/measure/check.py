"""Is a kernel's output right? One check for every backend."""

from __future__ import annotations

import math

import numpy as np

# Kernels sum fp32 products in a different order than the float64 reference, so
# results differ by rounding that grows with the reduction length; normalising the
# error by the largest output keeps near-zero outputs from failing a correct kernel,
# while a wrong index or a missed tile still gives errors of order 1.
RTOL = 1e-4


def rel_error(out: np.ndarray, ref: np.ndarray) -> float:
    """max|out-ref| / max(max|ref|, 1e-6); inf when anything is NaN or infinite."""
    if not np.all(np.isfinite(out)):
        return math.inf
    diff = np.abs(out.astype(np.float64) - ref.astype(np.float64))
    return float(diff.max(initial=0.0) / max(float(np.abs(ref).max(initial=0.0)), 1e-6))


def output_error(out: np.ndarray, ref: np.ndarray, rtol: float, inputs_after: dict[str, np.ndarray],
                 inputs: dict[str, np.ndarray]) -> str | None:
    """Why ``out`` (with the inputs as the kernel left them) is wrong; None when right."""
    err = rel_error(out, ref)
    if not err <= rtol:
        return "wrong result: " + ("NaN or inf in output" if math.isinf(err) else f"max rel err {err:.1e}")
    for name, a in inputs_after.items():
        if not np.array_equal(a, inputs[name]):
            return f"wrong result: kernel wrote to input {name}"
    return None
