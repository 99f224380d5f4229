"""Print the source a schedule generates, without the hardware it would run on.

C for the CPU (this machine's vector width); CUDA for a GPU, with its launch
configuration (grid, block, shared memory) in comments. ``--target cuda`` uses
the GPU here if there is one, else the usual limits of an sm_90 device, so the code
can be read (and compiled with nvcc) anywhere. ``--out FILE`` writes the source alone.

Examples:
  python -m experiments render --op matmul --shape 512x512x512
  python -m experiments render --op conv2d --shape 1,64,56,56,64,3,3,1,1 --target cuda --out conv.cu
  python -m experiments render --op matmul --shape 1024x1024x1024 --schedule runs/RUN/best.json
"""

from __future__ import annotations

import sys
from dataclasses import dataclass
from pathlib import Path

from kernels.codegen import render
from kernels.codegen.rules import check_dtype
from kernels.ir.ops import make_op
from kernels.target import target_or_description

from .bench import KernelChoice, load_schedule
from .config import field


@dataclass
class Config(KernelChoice):
    out: str | None = field(None, help="write the source alone to this file", metavar="FILE")


def run(cfg: Config) -> dict:
    op = make_op(cfg.op, cfg.shape, cfg.dtype)
    check_dtype(op.dtype, cfg.target)
    target = target_or_description(cfg.target)
    schedule = load_schedule(cfg.schedule, op, target)
    kernel = render(schedule, target)
    dtype = "" if op.dtype == "fp32" else f" {op.dtype}"
    head = f"// {op.kind} {op.shape_str}{dtype}, schedule {cfg.schedule}, for {target.device}\n"
    if cfg.out:
        Path(cfg.out).write_text(kernel.source)
        print(head.rstrip() + f"\n// written to {cfg.out}", file=sys.stderr)
    else:
        print(head + kernel.source, end="")
    return {"op": op.kind, "shape": op.shape_str, "target": target.kind, "function": kernel.name,
            "launch": kernel.launch, "shared_bytes": kernel.shared_bytes}
