"""Measure one schedule of an operator against the naive kernel and the vendor library.

The kernel is checked against the numpy reference before it is timed. The
library (numpy for the matmul family, torch for convolutions) and the kernel are
timed on the same inputs in alternating blocks (with pauses so that one's
spinning worker threads do not steal the other's cores), in a few rounds; the
ratio is taken per round, so a machine that changes speed under load skews both
alike.

Examples:
  python -m experiments bench --op matmul --shape 1024x1024x1024 --schedule expert
  python -m experiments bench --op conv2d --shape 1,64,56,56,64,3,3,1,1 --json
  python -m experiments bench --op matmul --shape 512x512x512 --schedule runs/x/tuning.jsonl --export out/
"""

from __future__ import annotations

import json
import shutil
import sys
from dataclasses import dataclass
from pathlib import Path


from kernels.measure import cluster
from kernels.experts import expert_schedule
from kernels.codegen.kernel import Kernel
from kernels.measure.library import library_name
from kernels.measure import Measurer, MeasureResult
from kernels.measure.comparison import Comparison, compare_with_library
from kernels.measure.runner import check_fits_in_memory
from kernels.codegen.rules import check_dtype
from kernels.ir.dtypes import DTYPES
from kernels.ir.ops import OPERATORS, Operator, make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule
from kernels.target import CC, CFLAGS, Target, get_target
from kernels.measure.tuning_log import TuningLog

from .config import field


@dataclass
class KernelChoice:
    """Which kernel: the operator, its shape, the target and the schedule (also ``render``'s)."""

    op: str = field(help="operator", choices=list(OPERATORS))
    shape: str = field(help="extents, e.g. 1024x1024x1024 (matmul) or N,C,H,W,K,R,S[,stride[,pad]] (conv2d)")
    target: str = field("cpu", help="cpu, or cuda (an NVIDIA GPU through CuPy)", choices=["cpu", "cuda"])
    dtype: str = field("fp32", help="data type: fp32, tf32 (fp32 storage, tensor-core math), bf16 or fp16 "
                                    "(fp32 accumulation); all but fp32 need --target cuda", choices=list(DTYPES))
    schedule: str = field("expert", help="naive, expert, a tuning log (its best record for this op "
                                         "and shape) or a best.json / kernel.json",
                          metavar="naive|expert|FILE")


@dataclass
class Config(KernelChoice):
    rounds: int = field(3, help="timing rounds; in each, the library and the kernel alternate in blocks")
    export: str | None = field(None, help="write kernel.c, kernel.so and kernel.json to this directory",
                               metavar="DIR")
    cluster: str | None = field(None, help="build and time on the Ray cluster at this address: auto, "
                                           "HEAD_IP:6379, or local (a throwaway one on this machine)",
                                metavar="ADDRESS")
    gpus: int | None = field(None, help="with --cluster local: start it with this many of this machine's GPUs "
                                        "(default: all), one runner each", metavar="K")
    json: bool = field(False, help="print one JSON object as the last line")


def load_schedule(spec: str, op: Operator, target: Target) -> Schedule:
    """``naive``, ``expert``, or the schedule stored in a tuning log / exported kernel.json."""
    if spec == "naive":
        return Schedule(op)
    if spec == "expert":
        try:
            return expert_schedule(op, target)
        except ValueError as e:   # an operator added without one
            raise ValueError(f"{e}; give --schedule naive, or a tune's best.json") from None
    path = Path(spec)
    if not path.is_file():
        raise FileNotFoundError(f"--schedule {spec!r} is neither naive, expert nor a file")
    if path.suffix == ".json":
        try:
            data = json.loads(path.read_text())
        except json.JSONDecodeError as e:
            raise ValueError(f"{path} is not JSON: {e}") from None
        if not isinstance(data, dict):
            raise ValueError(f"{path} holds no schedule object")
        if (data.get("op"), data.get("shape"), data.get("dtype", "fp32")) != (op.kind, op.shape_str, op.dtype):
            raise ValueError(f"{path} holds a schedule for {data.get('op')} {data.get('shape')} "
                             f"{data.get('dtype', 'fp32')}, not {op.kind} {op.shape_str} {op.dtype}")
        return Schedule.from_json(data, op)
    best = TuningLog(path, target).best(op.kind, op.shape_str, target.kind, op.dtype)
    if best is None:
        raise LookupError(f"{path} has no correct measurement of {op.kind} {op.shape_str} on {target.kind}")
    return Schedule.from_json({"steps": best.schedule}, op)


def export_kernel(directory: str, kernel: Kernel, built_path: str, schedule: Schedule, target: Target) -> Path:
    """``kernel.c`` + ``kernel.so`` (CPU) or ``kernel.cu`` (CUDA: compile it for your GPU, launch it
    with the grid and block in ``kernel.json``), and ``kernel.json`` describing the call."""
    out = Path(directory)
    out.mkdir(parents=True, exist_ok=True)
    meta = {**kernel.signature_json(), **schedule.to_json(), "target": target.to_json()}
    if kernel.is_cuda:
        (out / "kernel.cu").write_text(kernel.source)
        meta["compile"] = ["nvcc", "-O3", f"-arch={target.arch or 'native'}", "-cubin", "kernel.cu"]
    else:
        (out / "kernel.c").write_text(kernel.source)
        shutil.copyfile(built_path, out / "kernel.so")
        meta["compile"] = [CC, *CFLAGS, "kernel.c", "-o", "kernel.so"]
    (out / "kernel.json").write_text(json.dumps(meta, indent=2) + "\n")
    return out


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def run(cfg: Config) -> dict:
    op = make_op(cfg.op, cfg.shape, cfg.dtype)
    check_dtype(op.dtype, cfg.target)
    check_fits_in_memory(op)
    target = get_target(cfg.target)
    schedule = load_schedule(cfg.schedule, op, target)
    if cfg.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    lib = library_name(op, target.kind)

    backend = cluster.join(cfg.cluster, target, cfg.gpus) if cfg.cluster or cfg.gpus else None
    with Measurer(target, backend and backend.builder, backend and backend.runner, cache=False) as m:
        kernel = render(schedule, target)
        naive_kernel = render(Schedule(op), target, name=kernel.name + "_naive")
        _status(f"building {op.kind} {op.shape_str} ({cfg.schedule}) and the naive kernel ...")
        built, naive_built = m.builder.build([kernel, naive_kernel])
        if built.ok:
            _status(f"{cfg.rounds} rounds: {cfg.schedule}" + (f" alternating with {lib}" if lib else " (no library)"))
            (final,) = compare_with_library(m.runner, op, [(kernel, built.path)], target, cfg.rounds, bool(lib))
        else:
            final = Comparison((MeasureResult.failure(built.error or "build failed", build_s=built.build_s),))
        if cfg.schedule == "naive":
            naive = final.rounds[0]
        else:
            _status("timing the naive kernel ...")
            naive = (m.runner.run(op, naive_kernel, naive_built.path) if naive_built.ok else
                     MeasureResult.failure(naive_built.error or "build failed"))
        if cfg.export and built.ok:
            export_kernel(cfg.export, kernel, built.path, schedule, target)

    ok, library_ms = final.ok, final.library_time_ms
    summary = {
        "op": op.kind, "shape": op.shape_str, "dtype": op.dtype, "target": target.kind, "hardware": target.device,
        "schedule": cfg.schedule, "time_ms": final.time_ms, "time_spread_ms": final.time_spread_ms,
        "gflops": op.flops / final.time_ms / 1e6 if ok else 0.0,
        "library": lib, "library_time_ms": library_ms, "library_spread_ms": final.library_spread_ms,
        "library_gflops": op.flops / library_ms / 1e6 if library_ms else None,
        "fraction_of_library": final.fraction_of_library,
        "naive_time_ms": naive.time_ms,
        "speedup_vs_naive": naive.time_ms / final.time_ms if ok and naive.ok else None,
        "correct": ok, "error": final.error,
        "build_s": built.build_s, "rounds": len(final.rounds),
    }
    if backend:
        summary["cluster"] = backend.summary()
    _print_table(summary, cfg, op, target)
    return summary


def _print_table(s: dict, cfg: Config, op: Operator, target: Target) -> None:
    print(f"{s['op']} {s['shape']} {s['dtype']} on {target.device} ({target.cores} cores, {target.compiler})")
    print(f"{'kernel':<12}{'time ms':>12}{'GFLOPS':>10}")
    rows = [("naive", s["naive_time_ms"])] + ([(cfg.schedule, s["time_ms"])] if cfg.schedule != "naive" else [])
    for name, ms in rows + ([(s["library"], s["library_time_ms"] or float("inf"))] if s["library"] else []):
        gflops = op.flops / ms / 1e6 if 0 < ms < float("inf") else 0.0
        print(f"{name[-12:]:<12}{ms:>12.3f}{gflops:>10.1f}")
    if s["correct"]:
        speed = f"{s['speedup_vs_naive']:.1f}x naive, " if s["speedup_vs_naive"] else ""
        if s["library"]:
            print(f"{cfg.schedule}: {speed}{s['fraction_of_library']:.2f} of {s['library']} "
                  f"(median of {s['rounds']} rounds of alternating blocks; spread {s['time_spread_ms']:.3f} ms, "
                  f"{s['library']} {s['library_spread_ms']:.3f} ms)")
        else:
            print(f"{cfg.schedule}: {speed}no library to compare with (median of {s['rounds']} rounds; "
                  f"spread {s['time_spread_ms']:.3f} ms)")
    else:
        print(f"{cfg.schedule} FAILED: {s['error']}")
