"""Expert CUDA kernels against cuBLAS / cuDNN (fp32, TF32 off) on this machine's GPU.

For each case: render the expert schedule, compile it with NVRTC in the measurement
worker, check it against the numpy reference, then time it alternately with the
library (CUDA events), in a few rounds; the ratio is the median of the per-round
ratios. The naive kernel (one thread per output) is timed for scale.

  python -m experiments.cuda_bench                    # matmul 1024/2048/4096, conv2d 56x56x64
  python -m experiments.cuda_bench --case matmul:512x512x512 --rounds 5 --out cuda_bench.md
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time

from kernels.measure.library import library_name
from kernels.experts import expert_schedule
from kernels.measure import Builder, MeasureResult, Runner
from kernels.ir.ops import make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule
from kernels.target import get_target

CASES = ("matmul:1024x1024x1024", "matmul:2048x2048x2048", "matmul:4096x4096x4096",
         "conv2d:1,64,56,56,64,3,3,1,1")


def measure(runner: Runner, builder: Builder, op, schedule: Schedule, target, rounds: int, name: str) -> dict:
    """Rounds of (kernel, library) timings; NVRTC time from the first round."""
    t0 = time.perf_counter()
    kernel = render(schedule, target, name=name)
    built = builder.build([kernel])[0]
    results: list[MeasureResult] = []
    for _ in range(rounds):
        if not built.ok:
            results.append(MeasureResult.failure(built.error or "build failed"))
            break
        results.append(runner.run(op, kernel, built.path, library=True))
        if not results[-1].ok:
            break
    ok = all(r.ok for r in results)
    row = {"ok": ok, "error": next((r.error for r in results if not r.ok), None),
           "nvrtc_s": results[0].build_s, "run_s": sum(r.run_s for r in results),
           "wall_s": time.perf_counter() - t0, "launch": kernel.launch}
    if ok:
        row["ms"] = statistics.median(r.time_ms for r in results)
        row["lib_ms"] = statistics.median(statistics.median(r.library_times_ms) for r in results)
        row["ratio"] = statistics.median(statistics.median(r.library_times_ms) / r.time_ms for r in results)
    return row


def main(argv: list[str] | None = None) -> int:
    p = argparse.ArgumentParser(prog="python -m experiments.cuda_bench", description=__doc__,
                                formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--case", action="append", help="OP:SHAPE (repeatable); default: " + " ".join(CASES))
    p.add_argument("--rounds", type=int, default=3, help="timing rounds per kernel")
    p.add_argument("--min-time", type=float, default=0.3, help="seconds of kernel time per round")
    p.add_argument("--no-naive", action="store_true", help="skip the naive kernels")
    p.add_argument("--out", help="also write the markdown table to this file")
    args = p.parse_args(argv)
    try:
        target = get_target("cuda")
    except (OSError, ValueError) as e:
        print(f"error: {e}", file=sys.stderr)
        return 2
    builder = Builder()
    runner = Runner(timeout_s=120, repeats=50, warmup=3, min_time_s=args.min_time)
    lines = [f"Device: {target.device} ({target.arch}, {target.sm_count} SMs), {target.compiler}; "
             "fp32, TF32 off; times are medians of CUDA-event samples, kernel and library alternating.", "",
             "| op | shape | kernel | launch (grid, block) | time ms | GFLOPS | library | library ms | "
             "library GFLOPS | kernel/library | NVRTC s | check+time s |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    failed = False
    try:
        for case in args.case or CASES:
            kind, shape = case.split(":", 1)
            op = make_op(kind, shape)
            candidates = [("expert", expert_schedule(op, target))]
            if not args.no_naive:
                candidates.append(("naive", Schedule(op)))
            for label, schedule in candidates:
                print(f"{kind} {op.shape_str} {label} ...", file=sys.stderr, flush=True)
                r = measure(runner, builder, op, schedule, target, args.rounds, f"{kind}_{label}")
                grid, block = r["launch"]
                launch = f"{grid}, {block}".replace(" ", "")
                if r["ok"]:
                    gf, lib_gf = op.flops / r["ms"] / 1e6, op.flops / r["lib_ms"] / 1e6
                    lines.append(f"| {kind} | {op.shape_str} | {label} | {launch} | {r['ms']:.3f} | {gf:.0f} | "
                                 f"{library_name(op, 'cuda')} | {r['lib_ms']:.3f} | {lib_gf:.0f} | {r['ratio']:.2f} | "
                                 f"{r['nvrtc_s']:.2f} | {r['run_s']:.1f} |")
                else:
                    failed = failed or label == "expert"
                    lines.append(f"| {kind} | {op.shape_str} | {label} | {launch} | FAILED: {r['error']} | | | | | | "
                                 f"{r['nvrtc_s']:.2f} | {r['run_s']:.1f} |")
                print(lines[-1], file=sys.stderr, flush=True)
    finally:
        runner.close()
    table = "\n".join(lines) + "\n"
    print(table)
    if args.out:
        with open(args.out, "w") as f:
            f.write(table)
    return 1 if failed else 0


if __name__ == "__main__":
    sys.exit(main())
