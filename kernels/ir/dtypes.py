"""Data types an operator computes in: how its tensors are stored and how they multiply.

=======  ===========  ==========================================================
dtype    storage      arithmetic
=======  ===========  ==========================================================
fp32     float32      fp32 multiply-add (the default; CPU and GPU); on tensor
                      cores (``tensorize``, CUDA) 3xTF32: each operand split
                      into a tf32 high part and a tf32 remainder, three
                      instructions a tile (the remainders' product dropped),
                      each k slice summed into a fresh accumulator
tf32     float32      tensor cores round the inputs to tf32 (10-bit mantissa),
                      accumulate in fp32 (GPU only)
bf16     bfloat16     inputs and output in bf16, products accumulated in fp32,
                      the output rounded to bf16 once (GPU only)
fp16     float16      as bf16, in IEEE half precision (GPU only)
=======  ===========  ==========================================================

numpy has no bfloat16: on the host a bf16 tensor is its bits, a uint16 array
(:func:`encode`, :func:`decode`); on the device, kernels see ``unsigned short``.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np


@dataclass(frozen=True)
class DType:
    name: str
    bytes: int          # per stored element
    c_type: str         # the element type kernels declare
    mma_k: int          # k of the tensor-core instruction (m16n8k<mma_k>); 0: none
    quiet_nan: int      # bits of the quiet NaN (canaries add a payload below them)
    payload_bits: int   # free mantissa bits under the quiet bit
    split: bool = False  # tensor cores run it as 3xTF32 (operands split into high and low tf32)


DTYPES: dict[str, DType] = {
    "fp32": DType("fp32", 4, "float", 8, 0x7FC00000, 22, split=True),
    "tf32": DType("tf32", 4, "float", 8, 0x7FC00000, 22),
    "bf16": DType("bf16", 2, "unsigned short", 16, 0x7FC0, 6),
    "fp16": DType("fp16", 2, "unsigned short", 16, 0x7E00, 9),
}
DEFAULT = "fp32"


def word_type(dtype: str) -> type:
    """The unsigned integer type of one stored element (what canaries and bit-for-bit
    comparisons use)."""
    return np.uint16 if DTYPES[dtype].bytes == 2 else np.uint32


def encode(values: np.ndarray, dtype: str) -> np.ndarray:
    """``values`` rounded to nearest (even) into ``dtype``'s storage: float32, float16, or
    bf16 bits as uint16."""
    x = np.asarray(values, np.float32)
    if dtype == "fp16":
        return x.astype(np.float16)
    if dtype == "bf16":
        bits = x.view(np.uint32).astype(np.uint64)
        bits = (bits + 0x7FFF + ((bits >> 16) & 1)) >> 16
        return bits.astype(np.uint16)
    return x.copy()


def decode(stored: np.ndarray, dtype: str) -> np.ndarray:
    """The float32 values of ``dtype``-stored elements (exact)."""
    if dtype == "bf16":
        return (np.asarray(stored).astype(np.uint32) << 16).view(np.float32)
    return np.asarray(stored).astype(np.float32)
