"""A rendered kernel: source code plus the signature needed to call it."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass

from .ops import Tensor


@dataclass(frozen=True)
class Kernel:
    """C source defining ``void name(float* arg0, ...)`` taking ``args`` in order."""

    name: str
    source: str
    args: tuple[Tensor, ...]

    @property
    def digest(self) -> str:
        return hashlib.sha256(self.source.encode()).hexdigest()[:16]

    def signature_json(self) -> dict:
        return {"function": self.name,
                "args": [{"name": t.name, "shape": list(t.shape), "dtype": "float32", "role": t.role}
                         for t in self.args]}
