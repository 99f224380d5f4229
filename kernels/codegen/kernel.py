"""A rendered kernel: source code plus the signature needed to call it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from ..ir.ops import Tensor

STORAGE = {"fp32": "float32", "tf32": "float32", "bf16": "bfloat16", "fp16": "float16"}   # numpy/torch names


@dataclass(frozen=True)
class Kernel:
    """C source defining ``void name(float* arg0, ...)`` taking ``args`` in order; for a
    GPU, CUDA source of a ``__global__`` function launched as ``launch`` = (grid, block)."""

    name: str
    source: str
    args: tuple[Tensor, ...]
    launch: tuple[tuple[int, int, int], tuple[int, int, int]] | None = None  # None: a CPU kernel
    dtype: str = "fp32"   # the operator's (kernels.ir.dtypes): its tensors' element type
    shared_bytes: int = 0  # a GPU kernel's dynamic shared memory per block, given at launch

    @property
    def is_cuda(self) -> bool:
        return self.launch is not None

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def signature_json(self) -> dict:
        d = {"function": self.name,
             "args": [{"name": t.name, "shape": list(t.shape), "dtype": STORAGE[self.dtype], "role": t.role}
                      for t in self.args]}
        if self.launch is not None:
            d["launch"] = {"grid": list(self.launch[0]), "block": list(self.launch[1]),
                           "shared_bytes": self.shared_bytes}
        return d
