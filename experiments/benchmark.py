"""Run a benchmark suite and write its section of BENCHMARKS.md.

Each suite writes only its own section (between ``<!-- suite:NAME -->`` markers): the
new run on top, naming the machine and the command behind every row, and what the
section held before below it ("The run before"), so no figure measured earlier is lost.

Suites:
  kernels-cpu   expert schedules vs numpy/torch and vs the naive loop nest
  kernels-cuda  expert (and naive) CUDA kernels vs cuBLAS/cuDNN on this machine's GPU (fp32,
                TF32 off); without a GPU it stops with an error and writes nothing
  tensor-cuda   expert CUDA kernels in tf32, bf16 and fp16 (tensor cores) vs cuBLAS/cuDNN in the
                same dtype; without a GPU it stops with an error and writes nothing
  resnet-conv-cuda  every convolution of ResNet-50 (batch 1 and 16) in bf16: expert vs cuDNN
  tiles-cuda    the fp32 matmul expert's block tile against every candidate tile, product by product
  conv-tiles-cuda  the same for the fp32 conv2d expert's tile, layer by layer
  measure-cpu   cost of measuring one candidate: compile, check against the reference, time
  env-cpu       environment steps per second without measuring; where a random episode's time goes
  search-cpu    agents under one measurement budget: measurements to 90% of random search's best
  zeroshot-cpu  the shipped policy on held-out shapes (budget 1 and 8) vs annealing (budget 256)
  ppo-cpu       trained policies (--policy) against the shipped ones (or --against): greedy kernels, budget 8
  ppo-cuda      trained GPU policies (--policy, --dtype) against the shipped ones (or --against): greedy kernels
                where they differ, on shapes no GPU family trains on
  cluster-cpu   measurements per minute of a random search: local backend vs Ray with 1 and 2
                runners on this machine, and the per-candidate costs on Ray (build, transfer, run)
  cluster-cuda  GPU candidates per minute of a seeded random search on a local Ray cluster of 1, 2
                and all of this machine's GPUs, and train's steps per second with 1 and all; each
                configuration a command of its own (timed out, never taking the others down);
                without a GPU it stops with an error and writes nothing
  timing-cpu    the experts timed quiet and beside a busy process
  heldout-cpu   the default search (tune, --budget) on held-out shapes of every operator, --repeats
                runs a shape, against the library, the expert and the CPU's measured FMA peak
  heldout-wide-cpu  the same on 16 more shapes: the families' other held-out ones, and layers in no
                shape set
  heldout-cuda  the same on the GPU for held-out matmul and conv2d shapes in one --dtype
  models-cpu, models-cuda  tune-model on built-in models, fresh and again on the same database

Example:
  python -m experiments benchmark --suite kernels-cpu
"""

from __future__ import annotations

import contextlib
import dataclasses
import datetime
import functools
import json
import os
import resource
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

from kernels.experts import CONV_TILES, MATMUL_TILES, expert_schedule
from kernels.measure import Builder, MeasureResult, Measurer, Runner
from kernels.measure.library import library_name
from kernels.ir.ops import make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule
from kernels.target import Target, get_target

from . import bench
from .config import field, jsonable

SUITES = ("kernels-cpu", "kernels-cuda", "tensor-cuda", "resnet-conv-cuda", "measure-cpu", "env-cpu", "search-cpu",
          "zeroshot-cpu", "ppo-cpu", "ppo-cuda", "cluster-cpu", "cluster-cuda", "timing-cpu", "heldout-cpu",
          "heldout-wide-cpu", "heldout-cuda", "models-cpu", "models-cuda", "tiles-cuda", "conv-tiles-cuda",
          "operators-cpu")
MODEL_CASES = {"cpu": tuple((model, 1, "fp32") for model in ("resnet18", "mobilenet_v2")),   # (model, batch, dtype)
               "cuda": tuple((model, batch, dtype) for dtype in ("fp32", "bf16")
                             for model, batch in (("resnet50", 1), ("resnet50", 16), ("bert_layer", 1)))}

KERNELS_CPU = [
    ("matmul", "512x512x512"),
    ("matmul", "1024x1024x1024"),
    ("matmul", "2048x2048x2048"),
    ("conv2d", "1,64,56,56,64,3,3,1,1"),
    ("conv2d", "1,128,28,28,128,3,3,1,1"),
    ("dense_bias_relu", "1024x1024x1024"),
    ("batch_matmul", "8x256x256x256"),
    ("depthwise_conv2d", "1,128,56,56,3,3,1,1"),
    ("depthwise_conv2d", "1,96,112,112,3,3,2,1"),   # strided: vectorised over channels
    ("matmul", "1x1000x512"),                       # a classifier's GEMV: B read in place
    ("dense_bias_relu", "1x4096x1024"),
]


@dataclass
class Config:
    suite: str = field(help="which suite to run", choices=list(SUITES))
    out: str = field("BENCHMARKS.md", help="the markdown file whose section is rewritten")
    rounds: int = field(5, help="library/kernel timing rounds per row (kernels-cpu, kernels-cuda)")
    candidates: int = field(12, help="candidate kernels (measure-cpu) or episodes (env-cpu) to measure")
    budget: int = field(64, help="measurements per agent (search-cpu), per shape (heldout-cpu) or per tune "
                                 "(cluster-cpu, cluster-cuda)")
    anneal_budget: int = field(256, help="measurements of the annealing reference (zeroshot-cpu)")
    cluster_rounds: int = field(2, help="interleaved rounds of the configurations (cluster-cpu: local, Ray x1, "
                                        "Ray x2; cluster-cuda: 1, 2 and all GPUs)")
    train_timesteps: int = field(512, help="steps of each train run (cluster-cuda)")
    config_timeout: int = field(1800, help="seconds one configuration's command may run before it is stopped "
                                           "and marked failed (cluster-cuda)")
    repeats: int = field(3, help="runs per cell: bench runs, quiet and loaded (timing-cpu); tunes of each "
                                      "shape, seeds 0, 1, ... (heldout-cpu, heldout-wide-cpu)")
    model_budget: int = field(0, help="measurements per model (models-cpu, models-cuda; 0: 16 per task)")
    dtype: str = field("fp32", help="data type of heldout-cuda's tunes (fp16 takes bf16's shapes) and of "
                                    "ppo-cuda's policies; each its own section",
                       choices=["fp32", "tf32", "bf16", "fp16"])
    policy: list | None = field(None, help="trained policies (each a .pt, its .json beside it) that ppo-cpu "
                                           "and ppo-cuda compare with the shipped one of their operator", nargs="+")
    against: str | None = field(None, help="ppo-cpu, ppo-cuda: the policy (.pt) each --policy is compared with, "
                                           "in place of the shipped one (e.g. the imitation a PPO run started from)")
    time_limit: float = field(0, help="seconds after which tiles-cuda, conv-tiles-cuda and heldout-cuda start no "
                                      "new row and write the rows measured (0: no limit), so that a limit on the "
                                      "command costs the rows not yet measured, not the section")
    json: bool = field(False, help="print one JSON object as the last line")


def _kernels_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    rows, results = [], []
    header = ["| op | shape | ours GFLOPS | library | library GFLOPS | ours / library | x naive | command |",
              "|---|---|---:|---|---:|---:|---:|---|"]
    for kind, shape in KERNELS_CPU:
        cmd = f"python -m experiments bench --op {kind} --shape {shape} --schedule expert --rounds {cfg.rounds}"
        r = bench.run(bench.Config(op=kind, shape=shape, schedule="expert", rounds=cfg.rounds))
        results.append(r)
        naive = f"{r['speedup_vs_naive']:.1f}" if r["speedup_vs_naive"] else "-"
        ours = f"{r['gflops']:.1f}" if r["correct"] else f"FAILED: {r['error']}"
        lib = f"{r['library_gflops']:.1f}" if r["library_gflops"] else "-"
        rows.append(f"| {kind} | {shape} | {ours} | {r['library']} | {lib} | "
                    f"{r['fraction_of_library']:.2f} | {naive} | `{cmd}` |")
    notes = ["Expert schedules (`kernels/experts.py`), checked against the numpy reference before timing. "
             "`ours / library` is the median over rounds of the per-round ratio of median "
             "times; within a round the library and our kernel alternate in blocks (with pauses so "
             "that spinning worker threads of one do not steal cores from the other) on the same "
             "inputs, in the same process."]
    return notes + [""] + header + rows, results


TIMING_CASES = [("matmul", "256x256x256"), ("matmul", "1024x1024x1024"), ("conv2d", "1,64,56,56,64,3,3,1,1")]
NEIGHBOUR = [sys.executable, "-c", "while True: pass"]   # a CPU-bound process of another session


@contextlib.contextmanager
def _neighbour(on: bool):
    """A CPU-bound process at nice 19 in a session of its own (so in another scheduler
    autogroup, which takes half the cores whatever its nice value), for the block."""
    proc = subprocess.Popen(["nice", "-n", "19", *NEIGHBOUR], start_new_session=True) if on else None
    try:
        yield
    finally:
        if proc is not None:
            proc.kill()
            proc.wait()


def _timing_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    """The expert's GFLOPS and fraction of the library, quiet and beside a busy neighbour,
    at real-time priority (the default) and at normal priority (SCHEDGYM_REALTIME=0)."""
    header = ["| op | shape | priority | quiet GFLOPS | loaded GFLOPS | quiet of lib | loaded of lib | "
              "loaded / quiet (of lib) |", "|---|---|---|---:|---:|---:|---:|---:|"]
    rows, results = [], []
    for kind, shape in TIMING_CASES:
        for priority, flag in (("real-time", "1"), ("normal", "0")):
            figures = {}
            for loaded in (False, True):
                runs = []
                with _neighbour(loaded), _env(SCHEDGYM_REALTIME=flag):
                    for _ in range(cfg.repeats):
                        runs.append(bench.run(bench.Config(op=kind, shape=shape, schedule="expert",
                                                           rounds=cfg.rounds)))
                figures[loaded] = runs
                results.append({"op": kind, "shape": shape, "priority": priority, "loaded": loaded, "runs": runs})

            def spread(key: str, loaded: bool, fmt: str) -> str:
                v = [r[key] for r in figures[loaded] if r["correct"]]
                return f"{min(v):{fmt}}-{max(v):{fmt}}" if v else "failed"
            q = statistics.median(r["fraction_of_library"] for r in figures[False])
            lo = statistics.median(r["fraction_of_library"] for r in figures[True])
            rows.append(f"| {kind} | {shape} | {priority} | {spread('gflops', False, '.0f')} | "
                        f"{spread('gflops', True, '.0f')} | {spread('fraction_of_library', False, '.2f')} | "
                        f"{spread('fraction_of_library', True, '.2f')} | {lo / q:.2f} |")
    notes = [f"Each cell: the range over {cfg.repeats} runs of `python -m experiments bench --op OP --shape "
             f"SHAPE --schedule expert --rounds {cfg.rounds}` (each the median of its rounds). *loaded*: "
             "beside `setsid nice -n 19 python -c 'while True: pass'` (a session of its own, so an "
             "autogroup of its own); *normal* priority: `SCHEDGYM_REALTIME=0`. The last column is the "
             "median loaded fraction of the library over the median quiet one: the goal is within 10% of 1."]
    return notes + [""] + header + rows, results


@contextlib.contextmanager
def _env(**values: str):
    old = {k: os.environ.get(k) for k in values}
    os.environ.update(values)
    try:
        yield
    finally:
        for k, v in old.items():
            if v is None:
                os.environ.pop(k, None)
            else:
                os.environ[k] = v


KERNELS_CUDA = [
    ("matmul", "1024x1024x1024"),
    ("matmul", "2048x2048x2048"),
    ("matmul", "4096x4096x4096"),
    ("conv2d", "1,64,56,56,64,3,3,1,1"),
    ("conv2d", "1,512,28,28,128,1,1,1,0"),   # ResNet-50's pointwise layer: fp32 on tensor cores
    ("batch_matmul", "96x128x128x64"),    # attention's scores: batch 8 x 12 heads, 128 tokens
    ("batch_matmul", "48x384x64x384"),    # and its weighted values: batch 4 x 12 heads, 384 tokens
]
CUDA_MIN_TIME_S = 0.3  # kernel time per timing round


def _cuda_rounds(runner: Runner, builder: Builder, op, schedule: Schedule, target: Target, rounds: int,
                 name: str) -> dict:
    """Rounds of (kernel, library) timings of ``schedule``; NVRTC time from the first round."""
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
           "nvrtc_s": results[0].build_s, "run_s": sum(r.run_s for r in results), "launch": kernel.launch}
    if ok:
        row["ms"] = statistics.median(r.time_ms for r in results)
        row["lib_ms"] = statistics.median(statistics.median(r.library_times_ms) for r in results)
        row["ratio"] = statistics.median(statistics.median(r.library_times_ms) / r.time_ms for r in results)
    return row


def _cuda_cells(op, r: dict, per_flop: float) -> str:
    """A CUDA table row's cells from the launch on, from :func:`_cuda_rounds`'s result;
    throughput is FLOPs per ms over ``per_flop``: 1e6 gives GFLOPS, 1e9 TFLOP/s."""
    grid, block = r["launch"]
    launch = f"{grid}, {block}".replace(" ", "")
    tail = f"{r['nvrtc_s']:.2f} | {r['run_s']:.1f} |"
    if not r["ok"]:
        return f"{launch} | FAILED: {r['error']} | | | | | | {tail}"
    perf, lib_perf = op.flops / r["ms"] / per_flop, op.flops / r["lib_ms"] / per_flop
    return (f"{launch} | {r['ms']:.3f} | {perf:.0f} | {library_name(op, 'cuda')} | {r['lib_ms']:.3f} | "
            f"{lib_perf:.0f} | {r['ratio']:.2f} | {tail}")


def _kernels_cuda(cfg: Config, target: Target) -> tuple[list[str], list[dict]]:
    lines = ["fp32, TF32 off. Each kernel is compiled with NVRTC in the measuring worker, checked against "
             "the numpy reference, then timed alternately with the library (CUDA events) in "
             f"{cfg.rounds} rounds; *kernel/library* is the median of the per-round ratios. *NVRTC s* is the "
             "compile of one candidate, *check+time s* the check plus all timing rounds. The naive kernel "
             "(one thread per output) is timed for scale. An expert marked *3xTF32* runs fp32 on tensor cores: "
             "each operand split into a tf32 high part and a tf32 remainder, three instructions a tile, each k "
             "slice summed apart (`kernels/ir/dtypes.py`); it passes the same fp32 check.", "",
             "| op | shape | kernel | launch (grid, block) | time ms | GFLOPS | library | library ms | "
             "library GFLOPS | kernel/library | NVRTC s | check+time s |",
             "|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    results = []
    builder, runner = Builder(), Runner(timeout_s=120, repeats=50, warmup=3, min_time_s=CUDA_MIN_TIME_S)
    try:
        for kind, shape in KERNELS_CUDA:
            op = make_op(kind, shape)
            for label, schedule in (("expert", expert_schedule(op, target)), ("naive", Schedule(op))):
                print(f"{kind} {op.shape_str} {label} ...", file=sys.stderr, flush=True)
                r = _cuda_rounds(runner, builder, op, schedule, target, cfg.rounds, f"{kind}_{label}")
                shown = f"{label} (3xTF32)" if schedule.nest.tensorized else label
                lines.append(f"| {kind} | {op.shape_str} | {shown} | {_cuda_cells(op, r, 1e6)}")
                results.append({"op": kind, "shape": op.shape_str, "kernel": label,
                                **{k: v for k, v in r.items() if k != "launch"}})
    finally:
        runner.close()
    return lines, results


TENSOR_CUDA = [(dtype, "matmul", shape) for dtype in ("bf16", "fp16", "tf32")
               for shape in ("1024x1024x1024", "2048x2048x2048", "4096x4096x4096")] + [
    ("bf16", "dense_bias_relu", "4096x4096x4096"), ("bf16", "conv2d", "1,64,56,56,64,3,3,1,1")]


# fp32 matmul tiles tiles-cuda times (thread rows, thread cols, threads y, threads x, k slice):
# the expert's (chosen by waves) and others it could take
TILE_CANDIDATES = MATMUL_TILES + ((4, 4, 16, 16, 16), (8, 4, 16, 8, 32), (8, 4, 8, 8, 32), (8, 8, 16, 16, 16),
                                  (16, 8, 16, 16, 8))


# fp32 conv2d tiles conv-tiles-cuda times (channels and pixels per thread, threads z over
# channels, y over rows, x over columns, input channels per slice): the expert's (CONV_TILES)
# and others around them
CONV_TILE_CANDIDATES = CONV_TILES + ((4, 7, 4, 2, 8, 4), (2, 2, 8, 2, 32, 4), (2, 2, 8, 2, 32, 16), (2, 4, 8, 2, 16, 4),
                                    (2, 8, 8, 2, 8, 4), (2, 7, 8, 2, 8, 8), (2, 7, 8, 4, 8, 4), (4, 2, 8, 2, 32, 8),
                                    (2, 2, 16, 2, 16, 8))
# Layers of ResNet, VGG, Inception, DenseNet, YOLO, U-Net, SSD and odd ones, batch 1-32: the
# expert's rule (CONV_THREADS_PER_SM, CONV_MIN_REDUCTION) was chosen on the first split and
# checked on the second, drawn afterwards
CONV_TILE_LAYERS = {
    "fresh": ("1,128,56,56,32,3,3,1,1", "1,128,28,28,32,3,3,1,1", "1,128,14,14,32,3,3,1,1", "1,128,7,7,32,3,3,1,1",
              "1,3,240,240,32,3,3,2,1", "1,32,120,120,16,1,1,1,0", "8,128,28,28,128,3,3,1,1", "8,256,14,14,256,3,3,1,1",
              "8,512,7,7,512,3,3,1,1", "8,64,56,56,256,1,1,1,0", "1,64,96,96,64,3,3,1,1", "1,3,96,96,64,9,9,1,4",
              "4,64,64,64,64,3,3,1,1", "4,512,16,16,512,3,3,1,1", "1,512,38,38,512,3,3,1,1", "1,1024,19,19,1024,3,3,1,1",
              "1,256,10,10,512,3,3,2,1", "1,24,60,60,48,3,3,1,1", "2,40,45,45,80,5,5,1,2", "1,72,21,21,96,3,3,2,1",
              "5,16,100,100,32,3,3,1,1", "1,160,9,9,320,3,3,1,1", "1,128,56,56,128,3,3,2,1", "4,64,112,112,64,3,3,2,1",
              "2,256,28,28,256,3,3,2,1", "1,64,75,75,96,3,3,1,1", "1,80,73,73,192,3,3,1,0"),
    "chosen": ("1,64,56,56,64,3,3,1,1", "1,128,28,28,128,3,3,1,1", "1,256,14,14,256,3,3,1,1", "1,512,7,7,512,3,3,1,1",
               "1,64,56,56,128,3,3,2,1", "1,128,28,28,256,3,3,2,1", "1,3,224,224,64,7,7,2,3", "1,32,112,112,64,3,3,1,1",
               "1,96,35,35,96,3,3,1,1", "8,64,56,56,64,3,3,1,1", "16,128,28,28,128,3,3,1,1", "1,48,27,27,128,5,5,1,2",
               "1,16,64,64,32,3,3,1,1", "1,256,28,28,256,3,3,1,1", "4,256,14,14,256,3,3,1,1", "2,64,40,40,96,3,3,1,1",
               "1,64,224,224,64,3,3,1,1", "1,128,112,112,128,3,3,1,1", "1,256,56,56,256,3,3,1,1",
               "1,512,28,28,512,3,3,1,1", "1,512,14,14,512,3,3,1,1", "2,128,28,28,128,3,3,1,1", "32,64,56,56,64,3,3,1,1",
               "4,512,7,7,512,3,3,1,1", "1,192,35,35,64,1,1,1,0", "1,48,35,35,64,5,5,1,2", "1,32,147,147,64,3,3,1,1",
               "1,3,299,299,32,3,3,2,0", "1,32,208,208,64,3,3,2,1", "1,128,52,52,256,3,3,1,1",
               "1,256,26,26,512,3,3,1,1", "1,512,13,13,1024,3,3,1,1", "1,64,128,128,64,3,3,1,1",
               "1,128,64,64,128,3,3,1,1", "2,256,32,32,256,3,3,1,1", "1,32,112,112,64,1,1,1,0", "1,144,56,56,24,1,1,1,0",
               "1,384,14,14,64,1,1,1,0", "1,20,50,50,30,3,3,1,1", "3,48,33,33,72,3,3,2,1", "1,96,17,17,160,3,3,1,1",
               "8,32,28,28,64,3,3,1,1", "1,64,30,30,64,3,3,1,0", "16,64,14,14,128,3,3,1,1", "1,256,7,7,256,3,3,1,1",
               "2,32,80,80,64,3,3,1,1"),
}


def _out_of_time(cfg: Config, start: float, done: int, total: int, what: str) -> str | None:
    """The line a suite ends with when ``cfg.time_limit`` has passed since ``start`` and
    rows are left; None while it may go on."""
    if cfg.time_limit and done < total and time.monotonic() - start > cfg.time_limit:
        return f"Stopped at `--time-limit {cfg.time_limit:g}`: {done} of {total} {what} measured."
    return None


def _tile_shapes() -> list[tuple[str, str]]:
    """(split, shape) of the products tiles-cuda times: the 4 held out, the 40 of GPU_DRAWN,
    30 of gpu-more's train split, 16 of 512-2048 rows and columns (seeded, where the tile
    choice is closest) and 2048 and 4096."""
    import random

    from .shapes import FAMILIES, GPU_DRAWN

    fam = FAMILIES["matmul"]["gpu-more"]
    rng, sizes, ks = random.Random(7), (512, 640, 768, 896, 1024, 1152, 1280, 1536, 2048), (256, 512, 1024, 2048)
    known = {*fam["train"], *fam["held_out"], *GPU_DRAWN["matmul"]}
    middle: list[str] = []
    while len(middle) < 16:
        shape = f"{rng.choice(sizes)}x{rng.choice(sizes)}x{rng.choice(ks)}"
        if shape not in known and shape not in middle:
            middle.append(shape)
    return ([("held_out", s) for s in fam["held_out"]] + [("drawn", s) for s in GPU_DRAWN["matmul"]]
            + [("train", s) for s in random.Random(0).sample(fam["train"], 30)] + [("middle", s) for s in middle]
            + [("large", s) for s in ("2048x2048x2048", "4096x4096x4096")])


def _tiles_cuda(cfg: Config, target: Target, kind: str = "matmul") -> tuple[list[str], list[dict]]:
    """Every candidate tile of the fp32 expert of ``kind`` on the CUDA cores (matmul:
    TILE_CANDIDATES, conv2d: CONV_TILE_CANDIDATES) timed against the expert's own choice of
    tile, shape by shape: how close its choice (by waves for matmul, by threads for conv2d)
    comes to the best tile. Where the expert takes tensor cores instead (3xTF32), its tile
    rule is what it would take on the CUDA cores."""
    from kernels.experts import _gpu_conv2d, _gpu_matmul
    from kernels.measure.comparison import speedups_over

    if kind == "matmul":
        candidates, shapes, what = TILE_CANDIDATES, _tile_shapes(), "products"
        names = [f"{tm * ty}x{tn * tx}/{ty * tx}" for tm, tn, ty, tx, _ in candidates]
        build = functools.partial(_gpu_matmul, batch=False)
        rule = ("takes the first of its tiles that gives enough blocks per multiprocessor (`MATMUL_WAVES`); "
                "here each candidate tile (block rows x columns / threads; `TILE_CANDIDATES`, each with the "
                "expert's other steps: `_gpu_matmul(op, target, False, tile)`)")
    else:
        candidates, what = CONV_TILE_CANDIDATES, "layers"
        shapes = [(split, s) for split, layers in CONV_TILE_LAYERS.items() for s in layers]
        names = [f"{tk}x{xw}/{tz}x{ty}x{tx}/c{cb}" for tk, xw, tz, ty, tx, cb in candidates]
        build = _gpu_conv2d
        rule = ("takes the first of its tiles (`CONV_TILES`) whose grid has enough threads per multiprocessor "
                "(`CONV_THREADS_PER_SM`) where the window is wider than one and the reduction long enough; "
                "here each candidate tile (channels x pixels per thread / threads z x y x x / input channels "
                "per slice; `CONV_TILE_CANDIDATES`, each with the expert's other steps: "
                "`_gpu_conv2d(op, target, tile)`)")
    lines = [f"fp32, TF32 off. The expert (`kernels/experts.py`) {rule} is checked, then timed with the expert's "
             f"kernel in {cfg.rounds} alternating rounds: each cell is the median per-round ratio of the expert's "
             "time to the tile's (0: failed or not legal). *expert of best*: the expert's speed over the best "
             "tile's.", "",
             "| split | shape | expert's tile | best tile | expert of best | " + " | ".join(names) + " |",
             "|---|---|---|---|---:|" + "---:|" * len(names)]
    results, measurer, start, stopped = [], Measurer(target), time.monotonic(), None
    try:
        for split, shape in shapes:
            op = make_op(kind, shape)
            print(f"{kind} {shape}: {len(names)} tiles ...", file=sys.stderr, flush=True)
            expert = build(op, target)   # the tile rule's choice
            keys, kernels = [], {}   # each tile's kernel (None: the tile does not apply); clamped alike, one
            for tile in candidates:
                try:
                    sched = build(op, target, tile=tile)
                except ValueError:
                    keys.append(None)
                    continue
                keys.append(_same_kernel_key(sched, target))
                kernels.setdefault(keys[-1], sched)
            timed = dict(zip(kernels, speedups_over(op, list(kernels.values()), expert, target, measurer,
                                                    cfg.rounds)))
            ratios = [timed[k] if k is not None else 0.0 for k in keys]
            mine = _same_kernel_key(expert, target)
            own = keys.index(mine) if mine in keys else None
            best = max(range(len(ratios)), key=ratios.__getitem__)
            of_best = 1 / ratios[best] if ratios[best] else 0.0
            lines.append(f"| {split} | {shape} | {names[own] if own is not None else '-'} | {names[best]} | "
                         f"{of_best:.2f} | " + " | ".join(f"{r:.2f}" for r in ratios) + " |")
            results.append({"split": split, "shape": shape, "expert_tile": None if own is None else names[own],
                            "best_tile": names[best], "expert_of_best": of_best, "tiles": dict(zip(names, ratios))})
            if stopped := _out_of_time(cfg, start, len(results), len(shapes), what):
                break
    finally:
        measurer.runner.close()
    summary = []
    for split in dict.fromkeys(r["split"] for r in results):
        rows = [r["expert_of_best"] for r in results if r["split"] == split and r["expert_of_best"] > 0]
        if rows:
            summary.append(f"{split} {statistics.geometric_mean(rows):.2f} (lowest {min(rows):.2f}, "
                           f"{len(rows)} {what})")
    lines += ["", "The expert's tile against the best, geometric mean by split: " + "; ".join(summary) + "."]
    return lines + (["", stopped] if stopped else []), results


def _resnet_convs(dtype: str = "bf16") -> list[tuple[str, str, str]]:
    """(dtype, op, shape) of every distinct convolution of ResNet-50 at batch 1 and 16."""
    from models.tasks import extract
    from models.zoo import load_model

    cases = []
    for batch in (1, 16):
        _, module, example = load_model("resnet50", batch)
        cases += [(dtype, op.kind, op.shape_str) for op, _ in extract(module, example, dtype).tasks()
                  if "conv" in op.kind]
    return cases


def _tensor_cuda(cfg: Config, target: Target, cases: list[tuple[str, str, str]] = TENSOR_CUDA
                 ) -> tuple[list[str], list[dict]]:
    lines = ["Each row's library runs in the row's dtype: cuBLAS (through torch) in bf16 or fp16 with fp32 "
             "accumulation, or in fp32 with TF32 on; cuDNN likewise. Each kernel is compiled with NVRTC in "
             "the measuring worker, checked against the reference on the stored inputs with the dtype's "
             "tolerance (README, \"Data types\"), then timed alternately with the library (CUDA events) in "
             f"{cfg.rounds} rounds; *kernel/library* is the median of the per-round ratios. *NVRTC s* is "
             "the compile of one candidate, *check+time s* the check plus all timing rounds. *mma* says "
             "how the expert runs on tensor cores: `mma.sync` of warps (`tensorize`), `wgmma` of warpgroups "
             "(`tensorize` then `warpgroup`, Hopper), or not (no).", "",
             "| dtype | op | shape | mma | launch (grid, block) | time ms | TFLOP/s | library | library ms | "
             "library TFLOP/s | kernel/library | NVRTC s | check+time s |",
             "|---|---|---|---|---|---:|---:|---|---:|---:|---:|---:|---:|"]
    results = []
    builder, runner = Builder(), Runner(timeout_s=120, repeats=50, warmup=3, min_time_s=CUDA_MIN_TIME_S)
    try:
        for dtype, kind, shape in cases:
            op = make_op(kind, shape, dtype)
            schedule = expert_schedule(op, target)
            mma = "wgmma" if schedule.nest.warpgroup else "mma" if schedule.nest.tensorized else "no"
            print(f"{dtype} {kind} {op.shape_str} ...", file=sys.stderr, flush=True)
            r = _cuda_rounds(runner, builder, op, schedule, target, cfg.rounds, f"{kind}_{dtype}")
            lines.append(f"| {dtype} | {kind} | {op.shape_str} | {mma} | {_cuda_cells(op, r, 1e9)}")
            results.append({"dtype": dtype, "op": kind, "shape": op.shape_str, "mma": mma,
                            **{k: v for k, v in r.items() if k != "launch"}})
    finally:
        runner.close()
    return lines, results


def _candidate_schedules(op, n: int) -> list[Schedule]:
    """Distinct register-tile variants of the expert matmul schedule: real candidates,
    each compiled from scratch."""
    out = []
    for rows in (2, 3, 4, 5, 6, 7, 8):
        for cols in (8, 16, 32):
            s = Schedule(op).tile("i", "j", rows, cols).reorder("j_o", "i_o", "k", "i_i", "j_i")
            out.append(s.cache_write("i_o").vectorize("j_i").unroll("i_i").parallel("j_o").cache_read("B", "j_o"))
    return out[:n]


def _measure_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    target = get_target("cpu")
    op = make_op("matmul", "512x512x512")
    candidates = _candidate_schedules(op, cfg.candidates)
    with tempfile.TemporaryDirectory() as cache, Measurer(target, Builder(cache_dir=cache), Runner()) as m:
        t0 = time.perf_counter()
        results = m.measure(candidates)
        wall = time.perf_counter() - t0
    ok = [r for r in results if r.ok]
    build = statistics.median(r.build_s for r in results)
    run = statistics.median(r.run_s for r in results)
    per = [r.build_s + r.run_s for r in results]
    cmd = f"python -m experiments benchmark --suite measure-cpu --candidates {cfg.candidates}"
    lines = [f"{len(results)} distinct candidate schedules of matmul 512x512x512 (register-tile variants), "
             f"measured by `Measurer` from an empty build cache; {len(ok)} correct. Compiles run in parallel "
             f"({Builder().workers} workers), then each kernel is checked and timed alone.", "",
             "| figure | value | command |", "|---|---:|---|",
             f"| compile, median per candidate | {build:.3f} s | `{cmd}` |",
             f"| check + time, median per candidate | {run:.3f} s | `{cmd}` |",
             f"| compile + check + time, median per candidate | {statistics.median(per):.3f} s | `{cmd}` |",
             f"| batch wall time / candidates | {wall / len(results):.3f} s | `{cmd}` |"]
    return lines, [{"build_s": build, "run_s": run, "per_candidate_s": statistics.median(per),
                    "wall_per_candidate_s": wall / len(results), "correct": len(ok)}]


def _env_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    import numpy as np

    from agents.rollout import RandomDraw, rollout
    from envs.actions import ActionTable
    from envs.schedule_env import MAX_STEPS, ScheduleEnv

    from .shapes import family

    target = get_target("cpu")
    lines = ["Steps per second of mask + apply + featurize (no measurement), random masked actions "
             f"(`agents.rollout`), episodes of up to {MAX_STEPS - 1} steps, one process:", "",
             "| op | shape | steps/s | command |", "|---|---|---:|---|"]
    results = []
    cmd = "python -m experiments benchmark --suite env-cpu"
    for kind, shape in (("matmul", "1024x1024x1024"), ("conv2d", "1,64,56,56,64,3,3,1,1"),
                        ("batch_matmul", "8x256x256x256"), ("depthwise_conv2d", "1,128,56,56,3,3,1,1")):
        op = make_op(kind, shape)
        table, draw, steps = ActionTable(op, target), RandomDraw(np.random.default_rng(0), p_done=0.0), 0
        t0 = time.perf_counter()
        while time.perf_counter() - t0 < 3.0:
            steps += len(rollout(op, table, draw, observe=True).actions)
        rate = steps / (time.perf_counter() - t0)
        results.append({"op": kind, "steps_per_s": rate})
        lines.append(f"| {kind} | {shape} | {rate:.0f} | `{cmd}` |")

    episodes = cfg.candidates
    lines += ["", f"Where the time of a random-policy episode goes: {episodes} episodes of `ScheduleEnv` "
              "(reward `measure`, small matmul shapes of the `small` family, random masked actions, "
              "`done` with probability 0.1 per step), from an empty build cache:", "",
              "| part | seconds | share |", "|---|---:|---:|"]
    with tempfile.TemporaryDirectory() as cache:
        measurer = Measurer(target, Builder(cache_dir=cache), Runner())
        env = ScheduleEnv(op="matmul", shapes=family("matmul", "small"), measurer=measurer)
        rng = np.random.default_rng(0)
        t0 = time.perf_counter()
        for ep in range(episodes):
            env.reset(seed=ep)
            over = False
            while not over:
                mask = env.action_masks()
                a = env.table.done if rng.random() < 0.1 else int(rng.choice(np.flatnonzero(mask)))
                _, _, term, trunc, _ = env.step(a)
                over = term or trunc
        wall = time.perf_counter() - t0
        env.close()
    python_s = wall - measurer.build_s - measurer.run_s
    for part, sec in (("compile", measurer.build_s), ("run (check + time)", measurer.run_s),
                      ("Python (env, lowering, rendering, IPC)", python_s)):
        lines.append(f"| {part} | {sec:.2f} | {sec / wall:.0%} |")
    lines.append(f"| total ({measurer.measured} kernels measured) | {wall:.2f} | 100% |")
    results.append({"compile_s": measurer.build_s, "run_s": measurer.run_s, "python_s": python_s,
                    "wall_s": wall, "kernels": measurer.measured})
    return lines, results


SEARCH_CASES = [("matmul", "1024x1024x1024"), ("conv2d", "1,64,56,56,64,3,3,1,1")]
SEARCH_AGENTS = ("random", "filtered", "anneal", "beam", "ppo")


def _tune(kind: str, shape: str, agent: str, budget: int, runs: str, target: str = "cpu", dtype: str = "fp32",
          seed: int = 0) -> dict:
    from . import tune
    from .runs import read_progress

    summary = tune.run(tune.Config(op=kind, shape=shape, agent=agent, budget=budget, runs=runs, target=target,
                                   dtype=dtype, seed=seed))
    summary["progress"] = read_progress(Path(summary["run_dir"]))
    return summary


def _first_reaching(progress: list[dict], gflops: float) -> int | None:
    return next((p["measurements"] for p in progress if p["search/best_gflops"] >= gflops), None)


def _search_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    lines = [f"Every agent tunes the same shape with a budget of {cfg.budget} hardware measurements "
             "(`tune --agent A --budget B`, seed 0, shipped policy and cost model). *To 90%* counts the "
             "measurements an agent needed to reach 90% of the best GFLOPS that random search found "
             "with the whole budget (- if never); *of library* is the final best kernel against "
             "numpy/torch, timed in alternating blocks.", "",
             "| op | shape | agent | best GFLOPS | of library | to 90% of random's best | wall s | command |",
             "|---|---|---|---:|---:|---:|---:|---|"]
    results = []
    with tempfile.TemporaryDirectory() as runs:
        for kind, shape in SEARCH_CASES:
            by_agent = {a: _tune(kind, shape, a, cfg.budget, runs) for a in SEARCH_AGENTS}
            reference = 0.9 * by_agent["random"]["progress"][-1]["search/best_gflops"]
            for agent, r in by_agent.items():
                reach = _first_reaching(r["progress"], reference)
                cmd = f"python -m experiments tune --op {kind} --shape {shape} --agent {agent} --budget {cfg.budget}"
                lines.append(f"| {kind} | {shape} | {agent} | {r['gflops']:.1f} | "
                             f"{r['fraction_of_library'] or 0:.2f} | {reach if reach else '-'} | "
                             f"{r['wall_s']:.0f} | `{cmd}` |")
                results.append({k: v for k, v in r.items() if k not in ("progress", "best_schedule")}
                               | {"to_90pct_of_random": reach})
    return lines, results


ZEROSHOT_CASES = [("matmul", "768x768x768"), ("conv2d", "1,64,56,56,128,3,3,2,1")]  # held-out shapes


HELDOUT_CASES = [("matmul", "1024x1024x1024"), ("matmul", "768x768x768"), ("matmul", "127x255x65"),
                 ("batch_matmul", "8x128x128x64"), ("dense_bias_relu", "256x256x1024"),
                 ("conv2d", "1,64,56,56,128,3,3,2,1"), ("conv2d", "1,256,14,14,1024,1,1,1,0"),
                 ("depthwise_conv2d", "1,144,56,56,3,3,2,1")]   # held-out shapes of every operator


# heldout-wide-cpu: the families' other held-out shapes, and layers in no shape set (a GEMV,
# attention-sized batches, a batch of 4, a 5x5 and a strided 1x1 convolution)
HELDOUT_WIDE_CASES = [("matmul", "320x320x320"), ("matmul", "256x3072x768"), ("matmul", "100x200x300"),
                      ("matmul", "1x1024x1024"), ("dense_bias_relu", "384x1536x384"),
                      ("dense_bias_relu", "100x300x200"), ("batch_matmul", "12x256x256x64"),
                      ("batch_matmul", "3x100x50x70"), ("batch_matmul", "16x49x49x32"),
                      ("conv2d", "1,512,7,7,512,3,3,1,1"), ("conv2d", "1,128,56,56,128,3,3,2,1"),
                      ("conv2d", "4,64,28,28,64,3,3,1,1"), ("conv2d", "1,32,40,40,48,5,5,1,2"),
                      ("conv2d", "1,256,28,28,512,1,1,2,0"), ("depthwise_conv2d", "1,576,14,14,3,3,1,1"),
                      ("depthwise_conv2d", "1,960,7,7,3,3,1,1")]


ABOVE_EXPERT = 1.03   # heldout-cpu's bar: a tuned kernel more than 3% faster than the expert


def _spread(values: list[float], fmt: str = ".2f") -> str:
    """The median of ``values``, and their range where there are several."""
    med = f"{statistics.median(values):{fmt}}"
    return med if len(values) == 1 else f"{med} [{min(values):{fmt}}-{max(values):{fmt}}]"


def _heldout_cpu(cfg: Config, cases: list[tuple[str, str]] = HELDOUT_CASES) -> tuple[list[str], list[dict]]:
    """Every shape of ``cases`` tuned ``cfg.repeats`` times (seeds 0, 1, ...): the search's
    gain over the expert is a few percent on some shapes, about what this host moves a
    kernel between two timings, so one run per shape says little."""
    from kernels.measure.peak import fma_peak_gflops
    from kernels.target import cpu_target

    peak = fma_peak_gflops(cpu_target())
    runs = Path("runs") / f"benchmark-{cfg.suite}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    seeds = list(range(max(cfg.repeats, 1)))
    lines = [f"`tune` with its default search (`evolve`) and a budget of {cfg.budget} measurements on shapes "
             f"that no training saw, every operator, {len(seeds)} runs a shape (`--seed` {', '.join(map(str, seeds))}): "
             "the median, and the range in brackets. *of lib* comes from the final rounds (library and best "
             "kernel alternating in blocks), *of expert* from the best and the expert schedule timed in turn, "
             "a block of about 1 ms each, in one process (the median of the per-pair ratios); *above expert* "
             "counts the runs past 1.03 of it; *of peak* is the median GFLOPS over this CPU's fp32 FMA peak "
             f"measured the same hour ({peak:.0f} GFLOPS: independent FMAs on every core, "
             "`kernels/measure/peak.py`): a kernel near it leaves little for any schedule to find; *to 90%* is "
             "the most measurements a run needed to reach 90% of the speed of the kernel it returned, that kernel's "
             "re-measured figure (the expert's time as the search measured it over *of expert*) against the "
             "search's own times (the references, naive and expert, are measured outside the budget and count as "
             "found at 0; - if never). Each run's directory (log, best kernel, `summary.json`) is kept under "
             f"`{runs}`.", "",
             "| op | shape | GFLOPS | of peak | of lib | of expert | above expert | to 90% | tune wall s | command |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    results = []
    for kind, shape in cases:
        rs = [_tune(kind, shape, "evolve", cfg.budget, str(runs), seed=seed) for seed in seeds]
        gflops = statistics.median(r["gflops"] for r in rs)
        of_library = [r["fraction_of_library"] for r in rs]
        of_expert = [r["fraction_of_expert"] for r in rs if r["fraction_of_expert"]]
        reach = [r["measurements_to_90pct"] for r in rs]
        worst = "-" if None in reach else max(reach)
        seed_arg = " --seed S" if len(seeds) > 1 else ""
        lines.append(f"| {kind} | {shape} | {gflops:.1f} | {gflops / peak:.2f} | {_spread(of_library)} | "
                     f"{_spread(of_expert) if of_expert else '-'} | "
                     f"{sum(f > ABOVE_EXPERT for f in of_expert)} of {len(rs)} | "
                     f"{worst} | {statistics.median(r['wall_s'] for r in rs):.0f} | "
                     f"`python -m experiments tune --op {kind} --shape {shape} --budget {cfg.budget}{seed_arg}` |")
        results.append({"op": kind, "shape": shape, "gflops": gflops, "of_peak": gflops / peak,
                        "fraction_of_library": statistics.median(of_library),
                        "fraction_of_expert": statistics.median(of_expert) if of_expert else None,
                        "runs": [{"seed": seed} | {k: r[k] for k in ("gflops", "fraction_of_library", "fraction_of_expert",
                                                                     "wall_s", "measurements", "run_dir")}
                                 | {"to_90": r["measurements_to_90pct"]} for seed, r in zip(seeds, rs)]})
    above = sum((row["fraction_of_expert"] or 0) > ABOVE_EXPERT for row in results)
    library = min(row["fraction_of_library"] for row in results)
    reached = [r["to_90"] for row in results for r in row["runs"]]
    lines += ["", f"Above the expert by more than 3% in the median run: {above} of {len(results)} shapes. "
              f"Of the library, the lowest median: {library:.2f}. Measurements to 90%: "
              + ("never reached in some run." if None in reached else f"at most {max(reached)}.")]
    return lines, [{"peak_gflops": peak}] + results


# Operators of examples/operators.py, which no expert, policy or cost model has seen:
# a plain contraction (einsum its library), a 1-D convolution and a channels-last 2-D one
# (no library)
OWN_OPERATOR_CASES = [("matmul_nt", "512x512x512"), ("matmul_nt", "128x1024x64"), ("conv1d", "1,64,256,64,3"),
                      ("conv1d", "4,128,500,128,5"), ("conv2d_nhwc", "1,56,56,64,64,3,3,1,1"),
                      ("conv2d_nhwc", "1,28,28,128,128,3,3,1,1")]


def _operators_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    """Operators of your own (``examples/operators.py``), tuned by the default search with
    nothing of theirs but their declaration: sketches and random rollouts propose."""
    from kernels.ir import ops
    from kernels.measure.peak import fma_peak_gflops
    from kernels.target import cpu_target

    example = Path(__file__).resolve().parents[1] / "examples" / "operators.py"
    if "matmul_nt" not in ops.OPERATORS:
        os.environ[ops.OPERATORS_ENV] = os.pathsep.join(filter(None, [os.environ.get(ops.OPERATORS_ENV),
                                                                      str(example)]))   # the workers' too
        ops.load_operators(example)
    peak = fma_peak_gflops(cpu_target())
    runs = Path("runs") / f"benchmark-operators-cpu-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    seeds = list(range(max(cfg.repeats, 1)))
    lines = [f"Operators declared in `examples/operators.py` (`SCHEDGYM_OPERATORS=examples/operators.py`), "
             "which have no expert schedule, no policy and no shape family, and which the cost model never saw: "
             f"`tune` with its default search and a budget of {cfg.budget} measurements, {len(seeds)} runs a shape "
             f"(`--seed` {', '.join(map(str, seeds))}): the median and the range. *of peak* against this CPU's "
             f"fp32 FMA peak measured the same hour ({peak:.0f} GFLOPS); *of lib* against numpy's einsum (through "
             "BLAS) where the operator is a plain contraction, none for the convolutions; *to 90%* as in the "
             f"held-out section. Run directories under `{runs}`.", "",
             "| op | shape | GFLOPS | of peak | of lib | x naive | to 90% | tune wall s | command |",
             "|---|---|---:|---:|---:|---:|---:|---:|---|"]
    results = []
    for kind, shape in OWN_OPERATOR_CASES:
        rs = [_tune(kind, shape, "evolve", cfg.budget, str(runs), seed=seed) for seed in seeds]
        gflops = [r["gflops"] for r in rs]
        of_library = [r["fraction_of_library"] for r in rs if r["fraction_of_library"]]
        reach = [r["measurements_to_90pct"] for r in rs]
        lines.append(f"| {kind} | {shape} | {_spread(gflops, '.1f')} | {statistics.median(gflops) / peak:.2f} | "
                     f"{_spread(of_library) if of_library else '-'} | "
                     f"{statistics.median(r['speedup_vs_naive'] for r in rs):.1f} | "
                     f"{'-' if None in reach else max(reach)} | {statistics.median(r['wall_s'] for r in rs):.0f} | "
                     f"`SCHEDGYM_OPERATORS=examples/operators.py python -m experiments tune --op {kind} "
                     f"--shape {shape} --budget {cfg.budget} --seed S` |")
        results.append({"op": kind, "shape": shape, "gflops": statistics.median(gflops),
                        "of_peak": statistics.median(gflops) / peak,
                        "fraction_of_library": statistics.median(of_library) if of_library else None,
                        "runs": [{"seed": s} | {k: r[k] for k in ("gflops", "fraction_of_library", "speedup_vs_naive",
                                                                  "measurements_to_90pct", "wall_s", "run_dir")}
                                 for s, r in zip(seeds, rs)]})
    return lines, [{"peak_gflops": peak}] + results


_CUDA_TENSOR_CASES = [("matmul", "1024x1024x1024"), ("matmul", "256x3072x768"), ("matmul", "3000x1000x2000")]
# the operators alternate, so a run stopped by --time-limit has rows of both
HELDOUT_CUDA_CASES = {   # shapes of no train split, by dtype (tune --dtype); their sections below
    "fp32": [("matmul", "768x768x768"), ("conv2d", "1,64,56,56,128,3,3,2,1"), ("matmul", "3000x1000x2000"),
             ("conv2d", "1,512,7,7,512,3,3,1,1"), ("matmul", "256x3072x768")],
    "tf32": _CUDA_TENSOR_CASES,
    "bf16": [c for pair in zip(_CUDA_TENSOR_CASES, [("conv2d", "1,256,14,14,1024,1,1,1,0"),
                                                    ("conv2d", "16,256,14,14,1024,1,1,1,0"),
                                                    ("conv2d", "16,64,56,56,64,3,3,1,1")]) for c in pair]}
HELDOUT_CUDA_CASES["fp16"] = HELDOUT_CUDA_CASES["bf16"]


def _heldout_cuda(cfg: Config) -> tuple[list[str], list[dict]]:
    """heldout-cpu's figures on the GPU, for one dtype: a tune whose run fails costs its row."""
    library = "cuBLAS/cuDNN" + {"fp32": " in fp32, TF32 off", "tf32": " with TF32 on"}.get(cfg.dtype, f" in {cfg.dtype}")
    lines = [f"`tune --target cuda --dtype {cfg.dtype}` with its default search (`evolve`) and a budget of "
             f"{cfg.budget} measurements on shapes that no training saw. *of lib* is {library}'s time over the best "
             "kernel's, *of expert* the expert schedule's, all three timed in the same final rounds of alternating "
             "blocks (± the spread of the kernel's rounds); *to 90%* as in the CPU's section.", "",
             "| op | shape | best ms | lib ms | of lib | expert TFLOP/s | of expert | to 90% | tune wall s | command |",
             "|---|---|---:|---:|---:|---:|---:|---:|---:|---|"]
    results = []
    runs = Path("runs") / f"benchmark-heldout-cuda-{cfg.dtype}-{datetime.datetime.now():%Y%m%d-%H%M%S}"
    lines[0] += f" Each tune's run directory (log, best kernel, `summary.json`) is kept under `{runs}`."
    dtype = "" if cfg.dtype == "fp32" else f" --dtype {cfg.dtype}"
    cases, start = HELDOUT_CUDA_CASES[cfg.dtype], time.monotonic()
    for kind, shape in cases:
        if stopped := _out_of_time(cfg, start, len(results), len(cases), "shapes"):
            return lines + ["", stopped], results
        cmd = f"`python -m experiments tune --op {kind} --shape {shape} --target cuda{dtype} --budget {cfg.budget}`"
        try:
            r = _tune(kind, shape, "evolve", cfg.budget, str(runs), "cuda", cfg.dtype)
        except Exception as e:   # noqa: BLE001 - one shape's failure is its row's figure
            lines.append(f"| {kind} | {shape} | failed: {type(e).__name__}: {str(e)[:200]} | | | | | | | {cmd} |")
            results.append({"op": kind, "shape": shape, "error": str(e)})
            continue
        reach, expert, of_expert = r["measurements_to_90pct"], r["expert_gflops"], r["fraction_of_expert"]
        by_expert = f"{expert / 1000:.1f} | {of_expert:.2f}" if expert and of_expert else "- | -"
        lines.append(f"| {kind} | {shape} | {r['time_ms']:.4f} ± {r['time_spread_ms']:.4f} | "
                     f"{r['library_time_ms']:.4f} | **{r['fraction_of_library']:.2f}** | {by_expert} | "
                     f"{reach if reach is not None else '-'} | {r['wall_s']:.0f} | {cmd} |")
        results.append({k: r[k] for k in ("op", "shape", "dtype", "time_ms", "library_time_ms",
                                          "fraction_of_library", "fraction_of_expert", "wall_s",
                                          "measurements")} | {"to_90": reach})
    return lines, results


def _zeroshot_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    lines = ["Held-out shapes (never sampled in training). The shipped policy tunes each with "
             f"`--budget 1` (its greedy schedule alone) and `--budget 8`; `anneal` with "
             f"`--budget {cfg.anneal_budget}` is the long-search reference.", "",
             "| op | shape | ppo b=1 GFLOPS | ppo b=8 GFLOPS | anneal GFLOPS | b=1 / anneal | b=8 / anneal | "
             "commands |", "|---|---|---:|---:|---:|---:|---:|---|"]
    results = []
    with tempfile.TemporaryDirectory() as runs:
        for kind, shape in ZEROSHOT_CASES:
            one = _tune(kind, shape, "ppo", 1, runs)
            eight = _tune(kind, shape, "ppo", 8, runs)
            ref = _tune(kind, shape, "anneal", cfg.anneal_budget, runs)
            base = f"python -m experiments tune --op {kind} --shape {shape}"
            lines.append(f"| {kind} | {shape} | {one['gflops']:.1f} | {eight['gflops']:.1f} | {ref['gflops']:.1f} | "
                         f"{one['gflops'] / ref['gflops']:.2f} | {eight['gflops'] / ref['gflops']:.2f} | "
                         f"`{base} --agent ppo --budget 1`, `--budget 8`, "
                         f"`--agent anneal --budget {cfg.anneal_budget}` |")
            results.append({"op": kind, "shape": shape, "ppo_1": one["gflops"], "ppo_8": eight["gflops"],
                            "anneal": ref["gflops"]})
    return lines, results


def _ppo(cfg: Config, target: Target) -> tuple[list[str], list[dict]]:
    """Each trained policy against a base policy of its operator (``--against``, else the
    shipped one) on shapes no training saw: the greedy kernels of the held-out split and
    40 drawn shapes, timed where the two differ; on the CPU also a tune of 8 measurements
    with each on the held-out shapes."""
    if not cfg.policy:
        raise ValueError(f"--suite {cfg.suite} needs --policy PATH...: trained policies to compare with the "
                         "shipped ones")
    from .pretrained import policy_path

    metas = [_policy_spec(path) for path in cfg.policy]
    base_spec = _policy_spec(cfg.against) if cfg.against else None
    named = list(zip(cfg.policy, metas)) + ([(cfg.against, base_spec)] if base_spec else [])
    for path, meta in named:   # every policy checked before anything is measured
        if meta.get("target", target.kind) != target.kind:
            raise ValueError(f"{path} is a policy for {meta['target']}: --suite {cfg.suite} compares "
                             f"{target.kind} policies")
        if base_spec and base_spec.get("op") != meta.get("op"):
            raise ValueError(f"--against {cfg.against} is a {base_spec.get('op')} policy, {path} a "
                             f"{meta.get('op')} one")
        if meta.get("dtype", cfg.dtype) != cfg.dtype:   # policies saved before the field lack it
            raise ValueError(f"{path} was trained for {meta['dtype']}: compare it with --dtype {meta['dtype']}")
    # the shipped policy as a user names it; an operator the suite has no shapes for fails here
    bases = [cfg.against or os.path.relpath(policy_path(make_op(meta["op"], _shapes_of(meta["op"], target)[0][0],
                                                                cfg.dtype), target.kind)) for meta in metas]
    lines, results = [], []
    for path, meta, base in zip(cfg.policy, metas, bases):
        if target.kind == "cpu":
            more, rows = _budget8_against(path, base, meta)
            lines += more + [""]
            results += rows
        more, rows = _greedy_against(path, base, meta, cfg, target)
        lines += more + [""]
        results += rows
    return lines, results


def _policy_spec(path: str) -> dict:
    spec = Path(path).with_suffix(".json")
    if not spec.is_file():
        raise ValueError(f"{spec} not found: a policy's .json must lie beside its .pt")
    return json.loads(spec.read_text())


def _shapes_of(kind: str, target: Target) -> tuple[list[str], list[str]]:
    """An operator's held-out shapes and 40 drawn ones that no family of the target trains on."""
    from .shapes import CPU_DRAWN, GPU_DRAWN, family

    drawn = GPU_DRAWN if target.kind == "cuda" else CPU_DRAWN
    if kind not in drawn:
        raise ValueError(f"a policy for {kind!r}; --suite ppo-{target.kind} compares {', '.join(drawn)} policies")
    return family(kind, "held_out", "gpu-more" if target.kind == "cuda" else "many"), drawn[kind]


def _budget8_against(path: str, base: str, meta: dict) -> tuple[list[str], list[dict]]:
    """A tune of 8 measurements proposed by each policy on each held-out shape (CPU)."""
    from . import tune

    kind = meta.get("op")
    shapes, _ = _shapes_of(kind, get_target("cpu"))
    policies = {"base": base, "trained": path}
    lines = [f"{kind}: `{base}` (*base*) against `{path}` (*trained*"
             + (f": `{meta['command']}`" if meta.get("command") else "") + "), a tune of 8 measurements on each "
             "held-out shape with each policy proposing (`tune --agent ppo --budget 8 --policy P`): its best kernel "
             "against the expert, timed in turn with it in that run's final comparison.", "",
             "| shape | base of expert | trained of expert |", "|---|---:|---:|"]
    results = []
    with tempfile.TemporaryDirectory() as runs:
        for shape in shapes:
            of_expert = {n: tune.run(tune.Config(op=kind, shape=shape, agent="ppo", budget=8, policy=p,
                                                 runs=runs))["fraction_of_expert"] for n, p in policies.items()}
            lines.append(f"| {shape} | {of_expert['base']:.2f} | {of_expert['trained']:.2f} |")
            results.append({"op": kind, "shape": shape, **{f"{n}_budget8_of_expert": f for n, f in of_expert.items()}})
    return lines, results


NOISE = 0.97   # two kernels' ratio within 3% of 1: the same speed, as far as a few rounds can tell


def _greedy_against(path: str, base: str, meta: dict, cfg: Config, target: Target) -> tuple[list[str], list[dict]]:
    """A trained policy's greedy kernels against the base policy's on the held-out split
    and 40 drawn shapes: where the two differ, both timed against the expert (on a GPU in
    the same alternating rounds, on a CPU each in turn with it); a policy that rebuilds the
    base one's kernel everywhere changes nothing, and costs no timing."""
    from agents.policy import load_policy
    from agents.rollout import PolicyDraw, rollout
    from envs.actions import ActionTable
    from kernels.measure.comparison import speedups_over

    kind = meta.get("op")
    held_out, drawn = _shapes_of(kind, target)
    shapes = [*held_out, *drawn]
    policies = {"base": base, "trained": path}
    timing = (f"in {cfg.rounds} alternating rounds (*of expert*: the median per-round ratio"
              if target.kind == "cuda" else "each in turn with it (*of expert*: the median over pairs of short "
              "blocks") + " of the expert's time to the kernel's; 0: failed)."
    lines = [f"{kind}{f' in {cfg.dtype}' if target.kind == 'cuda' else ''}: `{base}` (*base*) against `{path}` "
             f"(*trained*), greedy, on the {len(held_out)} held-out shapes and the {len(drawn)} of "
             f"`shapes.{'GPU' if target.kind == 'cuda' else 'CPU'}_DRAWN`. Where their kernels differ, both are "
             f"timed with the expert's {timing}", "",
             "| shape | split | base is expert | trained is expert | base of expert | trained of expert | "
             "trained / base |", "|---|---|---|---|---:|---:|---:|"]
    # one network each: a target's action table is the same for every shape of an operator
    nets = {name: load_policy(p, make_op(kind, shapes[0], cfg.dtype), target) for name, p in policies.items()}
    results, measurer = [], Measurer(target)
    try:
        for shape in shapes:
            op = make_op(kind, shape, cfg.dtype)
            table = ActionTable(op, target)
            scheds = {name: rollout(op, table, PolicyDraw(net, deterministic=True)).schedule
                      for name, net in nets.items()}
            expert = expert_schedule(op, target)
            kernel = {name: _same_kernel_key(s, target) for name, s in {**scheds, "expert": expert}.items()}
            row = {"op": kind, "shape": shape, "split": "held_out" if shape in held_out else "drawn",
                   **{f"{n}_is_expert": kernel[n] == kernel["expert"] for n in policies}}
            if kernel["base"] != kernel["trained"]:
                print(f"{kind} {shape}: timing the two greedy kernels ...", file=sys.stderr, flush=True)
                of_base, of_trained = speedups_over(op, [scheds["base"], scheds["trained"]], expert, target,
                                                    measurer, cfg.rounds)
                row |= {"base_of_expert": of_base, "trained_of_expert": of_trained}
                ratio = f"{of_trained / of_base:.2f}" if of_base else "-"
                lines.append(f"| {shape} | {row['split']} | {'yes' if row['base_is_expert'] else 'no'} | "
                             f"{'yes' if row['trained_is_expert'] else 'no'} | {of_base:.2f} | {of_trained:.2f} | "
                             f"{ratio} |")
            results.append(row)
    finally:
        measurer.close()
    timed = [r for r in results if "trained_of_expert" in r]
    ratios = [r["trained_of_expert"] / r["base_of_expert"] for r in timed
              if r["base_of_expert"] and r["trained_of_expert"]]
    geomean = statistics.geometric_mean(ratios) if ratios else None
    worse_held_out = [r["shape"] for r in timed if r["split"] == "held_out"   # beyond the rounds' noise
                      and r["trained_of_expert"] < NOISE * r["base_of_expert"]]
    experts = {n: sum(r[f"{n}_is_expert"] for r in results) for n in policies}
    faster, slower = sum(r > 1 / NOISE for r in ratios), sum(r < NOISE for r in ratios)
    lines += ["", f"The greedy kernels differ on {len(timed)} of {len(results)} shapes"
              + (f"; trained / base geomean {geomean:.2f} there, range {min(ratios):.2f}-{max(ratios):.2f}, "
                 f"trained faster by more than {1 - NOISE:.0%} on {faster}, slower on {slower}" if ratios else "")
              + f". The expert's kernel: base on {experts['base']}, trained on {experts['trained']}."
              + (f" Trained slower by more than {1 - NOISE:.0%} on held-out {', '.join(worse_held_out)}."
                 if worse_held_out else "")]
    return lines, results


def _same_kernel_key(schedule: Schedule, target: Target) -> tuple:
    """What makes two schedules one kernel: the generated source and the launch."""
    k = render(schedule, target, name="k")
    return k.source, k.launch, k.shared_bytes


def _models(cfg: Config, target: Target) -> tuple[list[str], list[dict]]:
    """tune-model on each model into a fresh database, then again on the same database."""
    from . import tune_model

    lines = ["`tune-model` with a fresh tuning database: the model's layers tuned under one budget, then the "
             "model run with the tuned kernels (torch where torch's call is faster), checked against the original "
             "and timed against torch eager in rounds of alternating blocks (median, and the spread over rounds). "
             "*folded* is our traced graph, batch norms folded into the convolutions, with torch's kernels: "
             "*speedup vs folded* is what the tuned kernels bring. "
             "*again* is a second `tune-model` on the same database: its measurements and wall time.", "",
             "| model | batch | dtype | tasks | tuned kernels used | measurements | tune wall s | ours ms (spread) | "
             "torch ms (spread) | speedup | folded ms | speedup vs folded | again: measurements, wall s | command |",
             "|---|---:|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|---:|---|"]
    results = []
    with tempfile.TemporaryDirectory() as tmp:
        for model, batch, dtype in MODEL_CASES[target.kind]:
            db = str(Path(tmp) / f"{model}-{batch}-{dtype}.jsonl")
            budget = cfg.model_budget or None
            mc = tune_model.Config(model=model, batch=batch, target=target.kind, dtype=dtype, budget=budget,
                                   database=db, runs=tmp, rounds=cfg.rounds)
            flags = f" --batch {batch}" if batch != 1 else ""
            flags += f" --target {target.kind}" if target.kind != "cpu" else ""
            flags += f" --dtype {dtype}" if dtype != "fp32" else ""
            try:   # one model's failure is its row's, not the whole suite's
                first = tune_model.run(mc)
                t0 = time.perf_counter()
                again = tune_model.run(mc)
                again_s = time.perf_counter() - t0
            except Exception as e:
                print(f"{model} {dtype}: {type(e).__name__}: {e}", file=sys.stderr, flush=True)
                lines.append(f"| {model} | {batch} | {dtype} | failed: {type(e).__name__}: {str(e)[:200]} |"
                             + " |" * 9 + f" `python -m experiments tune-model --model {model}{flags}` |")
                results.append({"model": model, "batch": batch, "dtype": dtype, "error": f"{type(e).__name__}: {e}"})
                continue
            lines.append(f"| {model} | {batch} | {dtype} | {first['tasks']} | {first['layers_tuned']} | "
                         f"{first['measurements']} | {first['tune_wall_s']:.0f} | "
                         f"{first['model_ms']:.2f} ({first['model_spread_ms']:.2f}) | "
                         f"{first['torch_ms']:.2f} ({first['torch_spread_ms']:.2f}) | "
                         f"{first['speedup_vs_torch']:.2f} | "
                         f"{first['folded_ms']:.2f} | {first['speedup_vs_folded']:.2f} | "
                         f"{again['measurements']}, {again_s:.0f} | "
                         f"`python -m experiments tune-model --model {model}{flags} --budget {first['budget']}` |")
            results.append({k: first.get(k) for k in ("model", "batch", "dtype", "tasks", "layers_tuned",
                                                      "measurements", "tune_wall_s", "model_ms", "torch_ms",
                                                      "speedup_vs_torch", "folded_ms", "speedup_vs_folded")}
                           | {"again_measurements": again["measurements"], "again_wall_s": again_s})
    return lines, results


CLUSTER_CASE = ("matmul", "512x512x512")
CLUSTER_CONFIGS = (("local backend", 0), ("Ray, 1 runner", 1), ("Ray, 2 runners", 2))  # (name, runners)


@contextlib.contextmanager
def _fresh_cache(path: Path):
    """An empty build cache for what starts inside (Ray's workers inherit SCHEDGYM_CACHE
    from this process when the cluster starts), so no configuration reuses another's compiles."""
    saved = os.environ.get("SCHEDGYM_CACHE")
    os.environ["SCHEDGYM_CACHE"] = str(path)
    try:
        yield
    finally:
        if saved is None:
            os.environ.pop("SCHEDGYM_CACHE", None)
        else:
            os.environ["SCHEDGYM_CACHE"] = saved


@contextlib.contextmanager
def _one_machine_cluster(runners: int):
    """A throwaway Ray cluster on this machine (all its CPUs compile) with ``runners`` CPU
    runners; nothing for ``runners == 0``."""
    from kernels.measure import cluster

    if runners:
        cluster.connect("local", cpu_hosts=runners)
    try:
        yield
    finally:
        if runners:
            cluster.disconnect()


def _driver_cpu_s() -> float:
    """CPU seconds of this process (compilers, kernel workers and Ray's daemons excluded)."""
    r = resource.getrusage(resource.RUSAGE_SELF)
    return r.ru_utime + r.ru_stime


def _cluster_costs(n: int, root: Path) -> dict:
    """Per-candidate costs of measuring ``n`` register-tile variants of matmul 512, phase by
    phase, on the local backend and on Ray with one runner, each from an empty build cache
    and after a warm-up batch (worker processes started); Ray's start-up is timed apart."""
    from kernels.measure import cluster

    target = get_target("cpu")
    op = make_op(*CLUSTER_CASE)
    kernels = [render(s, target) for s in _candidate_schedules(op, n)]
    warm_op = make_op("matmul", "256x256x256")
    warm = [render(s, target) for s in _candidate_schedules(warm_op, 4)]
    out = {}
    for name, runners in (("local", 0), ("ray", 1)):
        with _fresh_cache(root / f"costs-{name}"):
            t_start = time.perf_counter()
            with _one_machine_cluster(runners):
                if runners:
                    b = cluster.backend(target)
                    builder, runner = b.builder, b.runner
                else:
                    builder, runner = Builder(), Runner()
                start_s = time.perf_counter() - t_start
                try:
                    list(runner.run_many(warm_op, [(k, bld.path) for k, bld in zip(warm, builder.build(warm))]))
                    runs0, dispatch0 = runner.runs, getattr(runner, "dispatch_s", 0.0)
                    compiles0, bytes0 = builder.compiles, getattr(builder, "artefact_bytes", 0)
                    cpu0, t0 = _driver_cpu_s(), time.perf_counter()
                    builds = builder.build(kernels)
                    t1 = time.perf_counter()
                    results = list(runner.run_many(op, [(k, bld.path) for k, bld in zip(kernels, builds)]))
                    t2 = time.perf_counter()
                    cpu = _driver_cpu_s() - cpu0
                finally:
                    runner.close()
        build_s = [bld.build_s for bld in builds]
        out[name] = {
            "build_s": statistics.median(build_s), "run_s": statistics.median(r.run_s for r in results),
            "build_wall_per": (t1 - t0) / n, "run_wall_per": (t2 - t1) / n,
            # wall time of the build phase beyond the compiles themselves, spread over its workers
            "build_overhead_s": max((t1 - t0) - sum(build_s) / builder.workers, 0.0) / n,
            "driver_cpu_s": cpu / n, "correct": sum(r.ok for r in results), "workers": builder.workers,
            "start_s": start_s,
        }
        if runners:
            out[name].update(dispatch_s=(runner.dispatch_s - dispatch0) / max(runner.runs - runs0, 1),
                             artefact_kib=(builder.artefact_bytes - bytes0) / max(builder.compiles - compiles0, 1)
                             / 1024)
    out["propose_s"] = _propose_s(op, target, 64)
    return out


def _propose_s(op, target, n: int) -> float:
    """Seconds the driver spends on one random-search candidate: a masked rollout, then rendering."""
    import numpy as np

    from agents.rollout import RandomDraw, rollout
    from agents.search import P_DONE
    from envs.actions import ActionTable

    table, draw = ActionTable(op, target), RandomDraw(np.random.default_rng(0), p_done=P_DONE)
    t0 = time.perf_counter()
    for _ in range(n):
        render(rollout(op, table, draw).schedule, target)
    return (time.perf_counter() - t0) / n


def _cluster_cpu(cfg: Config) -> tuple[list[str], list[dict]]:
    from . import tune

    kind, shape = CLUSTER_CASE
    base = f"python -m experiments tune --op {kind} --shape {shape} --agent random --budget {cfg.budget}"
    runs: dict[str, list[dict]] = {name: [] for name, _ in CLUSTER_CONFIGS}
    with tempfile.TemporaryDirectory() as tmp:
        root = Path(tmp)
        for rnd in range(cfg.cluster_rounds):
            order = CLUSTER_CONFIGS[rnd % 3:] + CLUSTER_CONFIGS[:rnd % 3]  # interleaved, rotating
            for name, runners in order:
                with _fresh_cache(root / f"{rnd}-{runners}"), _one_machine_cluster(runners):
                    runs[name].append(tune.run(tune.Config(
                        op=kind, shape=shape, agent="random", budget=cfg.budget, runs=str(root / "runs"),
                        cluster="local" if runners else None)))
        costs = _cluster_costs(cfg.candidates, root)

    def rate(s: dict) -> float:
        return s["measurements"] / s["wall_s"] * 60

    local = statistics.median(rate(s) for s in runs["local backend"])
    lines = [f"`{base}` (seed 0, the same candidates in every configuration), each run from an empty build "
             f"cache; {cfg.cluster_rounds} rounds, the three configurations interleaved in rotating order. "
             "*Per minute* counts measurements over the search's wall time (from the first proposal to the "
             "last result; Ray's start-up, the naive kernel and the final library comparison excluded). Ray "
             "runs on a throwaway cluster on this machine (`--cluster local`; with 2 runners, "
             "`connect(\"local\", cpu_hosts=2)`, like `ray start --head --resources='{\"cpu_host\": 2}'` and "
             "`--cluster auto`); both CPUs compile in every configuration. Two runners on one 2-core host time "
             "side by side and share its cores: that row shows the dispatch scaling, not timings to trust.", "",
             "| configuration | measurements / min (median) | per round | ratio to local | wall s / measurement "
             "| command |", "|---|---:|---|---:|---:|---|"]
    results = []
    for name, runners in CLUSTER_CONFIGS:
        rs = runs[name]
        med = statistics.median(rate(s) for s in rs)
        cmd = base + (" --cluster local" if runners == 1 else
                      " --cluster auto` after `ray start --head --resources='{\"cpu_host\": 2}'" if runners else "")
        lines.append(f"| {name} | {med:.1f} | {', '.join(f'{rate(s):.1f}' for s in rs)} | {med / local:.2f} | "
                     f"{60 / med:.3f} | `{cmd}` |")
        results.append({"config": name, "runners": runners, "per_min": med, "ratio": med / local,
                        "rounds": [rate(s) for s in rs]})
    ray1 = statistics.median(rate(s) for s in runs["Ray, 1 runner"])
    lines += ["", f"Ray's overhead per measurement, search level (1 runner vs local, same candidates): "
              f"{60 / ray1 - 60 / local:+.3f} s.", "",
              f"Per-candidate costs, phase by phase: {cfg.candidates} register-tile variants of matmul 512 "
              "(`measure-cpu`'s candidates), all compiled, then all run, from an empty build cache, after a "
              "warm-up batch of 4 others (worker processes started); Ray with one runner on this machine. "
              "*Start-up* is once per command: joining (here: starting) the cluster and its runner actors, or "
              "nothing locally (the local worker starts with the first kernel). *Build overhead* is the build phase's wall time beyond the compiles "
              "spread over the workers; *dispatch* is a runner call's wall time beyond the runner's own check "
              "and timing (task submission, the shared object moving to the actor, the result back); "
              "*driver CPU* is this process's CPU time for the batch (Ray's client included); *propose* is what "
              "the driver spends making a candidate in a random search (a masked rollout, then rendering C).", "",
              "| cost per candidate | local | Ray | command |", "|---|---:|---:|---|"]
    cmd = f"`python -m experiments benchmark --suite cluster-cpu --candidates {cfg.candidates}`"
    lo, ra = costs["local"], costs["ray"]
    for label, key, fmt in (("compile (median, on the worker)", "build_s", "{:.3f} s"),
                            ("build overhead", "build_overhead_s", "{:.3f} s"),
                            ("check + time (median, in the runner)", "run_s", "{:.3f} s"),
                            ("run phase wall / candidates", "run_wall_per", "{:.3f} s"),
                            ("driver CPU", "driver_cpu_s", "{:.4f} s")):
        lines.append(f"| {label} | {fmt.format(lo[key])} | {fmt.format(ra[key])} | {cmd} |")
    lines += [f"| propose (driver) | {costs['propose_s']:.4f} s | {costs['propose_s']:.4f} s | {cmd} |",
              f"| start-up, once | {lo['start_s']:.2f} s | {ra['start_s']:.2f} s | {cmd} |",
              f"| runner dispatch (Ray) | - | {ra['dispatch_s']:.4f} s | {cmd} |",
              f"| shared object shipped (Ray) | - | {ra['artefact_kib']:.1f} KiB | {cmd} |",
              f"| correct | {lo['correct']}/{cfg.candidates} | {ra['correct']}/{cfg.candidates} | {cmd} |"]
    results.append({"costs": costs})
    return lines, results


CLUSTER_CUDA_CASE = ("matmul", "1024x1024x1024")


def _gpu_counts(n: int) -> list[int]:
    """1, 2 and all of ``n`` GPUs (fewer where they coincide)."""
    return sorted({k for k in (1, 2, n) if k <= n})


def _command(args: list[str], root: Path, timeout_s: int) -> dict:
    """``python -m experiments ARGS --json`` in a process of its own, with fresh build and
    CuPy kernel caches (no configuration reuses another's compiles): its JSON, or why it
    failed. A crash, a hang or an error costs that configuration only."""
    root.mkdir(parents=True, exist_ok=True)
    env = {**os.environ, "SCHEDGYM_CACHE": str(root / "cache"), "CUPY_CACHE_DIR": str(root / "cupy"),
           "PYTHONPATH": os.pathsep.join(p for p in (str(Path(__file__).resolve().parents[1]),
                                                     os.environ.get("PYTHONPATH")) if p)}
    t0 = time.perf_counter()
    try:
        proc = subprocess.run([sys.executable, "-m", "experiments", *args, "--runs", str(root / "runs"), "--json"],
                              env=env, capture_output=True, text=True, timeout=timeout_s)
    except subprocess.TimeoutExpired:
        return {"error": f"timed out after {timeout_s} s{_progress(root / 'runs')}",
                "command_wall_s": time.perf_counter() - t0}
    lines = proc.stdout.strip().splitlines()
    if proc.returncode != 0 or not lines:
        why = (proc.stderr.strip().splitlines() or [f"exit status {proc.returncode}"])[-1]
        return {"error": why[:300], "command_wall_s": time.perf_counter() - t0}
    try:
        out = json.loads(lines[-1])
    except ValueError:
        return {"error": f"no JSON line: {lines[-1][:200]}", "command_wall_s": time.perf_counter() - t0}
    return out | {"command_wall_s": time.perf_counter() - t0}


def _progress(runs: Path) -> str:
    """How far a stopped command's search had come, from its run's ``progress.jsonl``, so a
    configuration that ran out of time still says at what rate it measured."""
    for path in sorted(runs.glob("*/progress.jsonl")):
        for line in reversed(path.read_text().splitlines()):   # the last whole line: a kill can cut one
            try:
                last = json.loads(line)
            except ValueError:
                continue
            n, wall = last.get("measurements"), last.get("search/wall_time_s")
            if n and wall:
                return f" ({n} measurements in {wall:.0f} s of search, {n / wall * 60:.1f}/min)"
    return ""


def _cluster_cuda(cfg: Config, target: Target) -> tuple[list[str], list[dict]]:
    from kernels.target import cuda_devices

    n = cuda_devices()
    counts = _gpu_counts(n)
    kind, shape = CLUSTER_CUDA_CASE
    tune_args = ["tune", "--op", kind, "--shape", shape, "--target", "cuda", "--agent", "random",
                 "--budget", str(cfg.budget), "--rounds", "1", "--cluster", "local"]
    train_args = ["train", "--op", kind, "--target", "cuda", "--shapes", "gpu", "--timesteps",
                  str(cfg.train_timesteps), "--n-steps", "64", "--batch-size", "64", "--imitation-epochs", "0",
                  "--cluster", "local"]
    configs = [("tune", k) for k in counts] + [("train", k) for k in sorted({1, n})]
    Path("runs").mkdir(exist_ok=True)
    raw = Path("runs") / f"benchmark-cluster-cuda-{datetime.datetime.now():%Y%m%d-%H%M%S}.jsonl"
    print(f"cluster-cuda: {n} GPUs ({target.device}); {len(configs)} configurations x {cfg.cluster_rounds} "
          f"rounds; every result is appended to {raw} as it comes", file=sys.stderr)
    runs: dict[tuple[str, int], list[dict]] = {c: [] for c in configs}
    with tempfile.TemporaryDirectory() as tmp:
        done = 0
        for rnd in range(cfg.cluster_rounds):
            order = configs[rnd % len(configs):] + configs[:rnd % len(configs)]  # interleaved, rotating
            for command, k in order:
                args = (tune_args if command == "tune" else train_args) + ["--gpus", str(k)]
                out = _command(args, Path(tmp) / f"{command}-{k}-{rnd}", cfg.config_timeout)
                out |= {"command": command, "gpus": k, "round": rnd}
                runs[(command, k)].append(out)
                with raw.open("a") as f:
                    f.write(json.dumps(jsonable(out)) + "\n")
                done += 1
                figure = (out.get("error") or (f"{_per_min(out):.1f} candidates/min" if command == "tune"
                                               else f"{out.get('steps_per_s') or 0:.2f} steps/s"))
                print(f"[{done}/{len(configs) * cfg.cluster_rounds}] {command}, {k} GPU{'s' * (k > 1)}, "
                      f"round {rnd + 1}: {figure}", file=sys.stderr)

    def median(command: str, k: int, figure) -> float | None:
        ok = [figure(r) for r in runs[(command, k)] if "error" not in r]
        return statistics.median(ok) if ok else None

    def rounds_of(command: str, k: int, figure, fmt: str) -> str:
        return ", ".join(f"failed: {r['error']}".replace("|", "/") if "error" in r else fmt.format(figure(r))
                         for r in runs[(command, k)])

    one = median("tune", 1, _per_min)
    lines = [f"`{' '.join(['python -m experiments', *tune_args])} --gpus K` (seed 0: the same candidates in every "
             f"configuration), each command in a process of its own with empty build and kernel caches; "
             f"{cfg.cluster_rounds} rounds, the configurations interleaved in rotating order. `--gpus K` starts a "
             "local Ray cluster with K of this machine's GPUs, one runner each; the search proposes batches of "
             "max(8, K) and the next while one is measured. *Per minute* counts measurements over the search's "
             "wall time (Ray's start-up, the reference kernel, the naive kernel and the final comparison "
             "excluded). *Of K x 1 GPU* is the rate against K times one GPU's (goal: 0.8 or more). *Reference* "
             f"is the naive matmul every runner times at start-up (median ms per runner; slow ones marked).", "",
             "| GPUs | candidates / min (median) | per round | of K x 1 GPU | reference ms per runner | command |",
             "|---:|---:|---|---:|---|---|"]
    results = []
    for k in counts:
        med = median("tune", k, _per_min)
        ratio = med / (k * one) if med and one else None
        cmd = " ".join(["python -m experiments", *tune_args, "--gpus", str(k)])
        lines.append(f"| {k} | {_fmt(med, '{:.1f}')} | {rounds_of('tune', k, _per_min, '{:.1f}')} | "
                     f"{_fmt(ratio, '{:.2f}')} | {_reference(runs[('tune', k)])} | `{cmd}` |")
        results.append({"command": "tune", "gpus": k, "per_min": med, "of_k_times_one": ratio,
                        "rounds": runs[("tune", k)]})
    lines += ["", f"`train` on the same local cluster: `--n-envs 0` steps as many environments as there are "
              f"GPUs; *steps / s* is PPO's environment steps over the learning wall time "
              f"({cfg.train_timesteps} steps, no imitation, the surrogate reward: the final kernel of each "
              "episode is measured).", "",
              "| GPUs | steps / s (median) | per round | command |", "|---:|---:|---|---|"]

    def steps(r: dict) -> float:
        return r.get("steps_per_s") or 0.0

    for k in sorted({1, n}):
        cmd = " ".join(["python -m experiments", *train_args, "--gpus", str(k)])
        med = median("train", k, steps)
        lines.append(f"| {k} | {_fmt(med, '{:.2f}')} | {rounds_of('train', k, steps, '{:.2f}')} | `{cmd}` |")
        results.append({"command": "train", "gpus": k, "steps_per_s": med, "rounds": runs[("train", k)]})
    if n == 1:
        lines += ["", "This machine has one GPU: no scaling figure."]
    failed = sum("error" in r for rs in runs.values() for r in rs)
    if failed:
        lines += ["", f"{failed} of {len(configs) * cfg.cluster_rounds} commands failed (their rounds say why)."]
    return lines, results


def _options(cfg: Config) -> str:
    """The options given beside ``--suite`` that differ from their defaults, as typed: the
    suite command that the section names reproduces its run. ppo-cuda's dtype names its
    section, so it is always said."""
    said = {"dtype"} if cfg.suite == "ppo-cuda" else set()
    words = []
    for f in dataclasses.fields(Config):
        value = getattr(cfg, f.name)
        if f.name in ("suite", "out", "json") or (value == f.default and f.name not in said):
            continue
        flag = "--" + f.name.replace("_", "-")
        words.append(f"{flag} {' '.join(map(str, value)) if isinstance(value, list) else value}")
    return "".join(" " + w for w in words)


def _per_min(r: dict) -> float:
    return r["measurements"] / r["wall_s"] * 60 if r.get("wall_s") else 0.0


def _fmt(x: float | None, fmt: str) -> str:
    return "-" if x is None else fmt.format(x)


def _reference(rs: list[dict]) -> str:
    """Each runner's median time of the reference kernel in the first run that has them."""
    for r in rs:
        runners = (r.get("cluster") or {}).get("runners")
        if runners:
            return ", ".join(f"{x['runner']}: {_fmt(x['median_ms'], '{:.4f}')}" + (" (slow)" if x["slow"] else "")
                             for x in runners)
    return "-"


def write_section(path: Path, suite: str, title: str, lines: list[str]) -> None:
    """The suite's section with this run on top; what the section held before stays below
    it, under "The run before" (a benchmark never deletes figures measured earlier)."""
    begin, end = f"<!-- suite:{suite} -->", f"<!-- /suite:{suite} -->"
    text = path.read_text() if path.exists() else (
        "# Benchmarks\n\nEvery figure below was measured by the command beside it; each section "
        "names the machine and the command that rewrites it.\n")
    earlier = []
    if begin in text and end in text:
        head, rest = text.split(begin, 1)
        before, tail = rest.split(end, 1)
        before = before.strip("\n").partition("\n")[2].strip("\n")   # less its title
        earlier = ["", "### The run before", "", before] if before else []
    else:
        head, tail = text.rstrip("\n") + "\n\n", "\n"
    path.write_text(head + "\n".join([begin, f"## {title}", "", *lines, *earlier, end]) + tail)


TITLES = {"kernels-cpu": "CPU kernels: expert schedules vs the libraries",
          "kernels-cuda": "CUDA kernels: expert schedules vs cuBLAS / cuDNN",
          "tensor-cuda": "Tensor cores: expert tf32, bf16 and fp16 kernels vs cuBLAS / cuDNN in the same dtype",
          "resnet-conv-cuda": "ResNet-50's convolutions in bf16, batch 1 and 16: the expert vs cuDNN",
          "tiles-cuda": "The fp32 GPU matmul expert's block tile against the others, product by product",
          "conv-tiles-cuda": "The fp32 GPU conv2d expert's tile against the others, layer by layer",
          "measure-cpu": "CPU measurement cost per candidate",
          "env-cpu": "Environment throughput and episode time split",
          "search-cpu": "Search agents under one measurement budget",
          "zeroshot-cpu": "Zero-shot tuning of held-out shapes",
          "ppo-cpu": "A trained policy against another: greedy kernels and 8 measurements on shapes it never saw",
          **{f"ppo-cuda-{d}": f"A trained GPU policy against another in {d}: greedy kernels on shapes no "
             "GPU family trains on" for d in ("fp32", "tf32", "bf16", "fp16")},
          "cluster-cpu": "Measuring on a Ray cluster: throughput and cost per candidate",
          "cluster-cuda": "Measuring on several GPUs of one host: candidates per minute and train steps per second",
          "timing-cpu": "Timing under load: quiet and beside a busy neighbour",
          "heldout-cpu": "The default search on held-out shapes of every operator",
          "heldout-wide-cpu": "The default search on more shapes that no training saw",
          "operators-cpu": "Operators of your own: tuned with no expert, policy or shape family",
          "heldout-cuda": "The default search on the GPU: held-out matmul and conv2d shapes, fp32 (TF32 off)",
          **{f"heldout-cuda-{d}": f"The default search on the GPU in {d}: held-out matmul and conv2d shapes"
             for d in ("tf32", "bf16", "fp16")},
          "models-cpu": "Whole models on the CPU: tune-model against torch",
          "models-cuda": "Whole models on the GPU: tune-model against torch in fp32 (TF32 off) and bf16"}


def _machine(target: Target) -> str:
    if target.kind == "cuda":
        return f"Machine: {target.device} ({target.arch}, {target.sm_count} SMs), {target.compiler}"
    return (f"Machine: {target.device}, {target.cores} cores, {target.vector_lanes} fp32 SIMD lanes, "
            f"{target.compiler}")


def run(cfg: Config) -> dict:
    target = get_target(cfg.suite.rsplit("-", 1)[1])   # no GPU: NoCudaDevice, before anything is written
    if cfg.suite == "kernels-cuda":
        lines, results = _kernels_cuda(cfg, target)
    elif cfg.suite == "tensor-cuda":
        lines, results = _tensor_cuda(cfg, target)
    elif cfg.suite == "resnet-conv-cuda":
        lines, results = _tensor_cuda(cfg, target, _resnet_convs())
    elif cfg.suite == "tiles-cuda":
        lines, results = _tiles_cuda(cfg, target)
    elif cfg.suite == "conv-tiles-cuda":
        lines, results = _tiles_cuda(cfg, target, "conv2d")
    elif cfg.suite == "cluster-cuda":
        lines, results = _cluster_cuda(cfg, target)
    elif cfg.suite == "heldout-cuda":
        lines, results = _heldout_cuda(cfg)
    elif cfg.suite.startswith("ppo-"):
        lines, results = _ppo(cfg, target)
    elif cfg.suite.startswith("models-"):
        lines, results = _models(cfg, target)
    else:
        lines, results = {"kernels-cpu": _kernels_cpu, "measure-cpu": _measure_cpu, "env-cpu": _env_cpu,
                          "search-cpu": _search_cpu, "zeroshot-cpu": _zeroshot_cpu,
                          "cluster-cpu": _cluster_cpu, "timing-cpu": _timing_cpu,
                          "heldout-cpu": _heldout_cpu,
                          "heldout-wide-cpu": functools.partial(_heldout_cpu, cases=HELDOUT_WIDE_CASES),
                          "operators-cpu": _operators_cpu}[cfg.suite](cfg)
    stamp = datetime.date.today().isoformat()
    section = cfg.suite
    if cfg.suite == "ppo-cuda" or (cfg.suite == "heldout-cuda" and cfg.dtype != "fp32"):   # a section a dtype
        section = f"{cfg.suite}-{cfg.dtype}"
    machine = [f"{_machine(target)}; measured {stamp}. "
               f"Suite command: `python -m experiments benchmark --suite {cfg.suite}{_options(cfg)}`.", ""]
    write_section(Path(cfg.out), section, TITLES[section], machine + lines)
    print(f"wrote section {section} of {cfg.out}")
    return {"suite": cfg.suite, "results": results}
