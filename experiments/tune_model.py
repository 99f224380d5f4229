"""Tune a whole PyTorch model: its layers as tasks under one budget, then run it with the kernels.

The model (built in: resnet18, resnet50, mobilenet_v2, bert_layer, all with random
weights; or FILE.py:FACTORY, a function returning (module, example_input)) is traced
with torch.fx, its batch norms folded, and every convolution, depthwise convolution,
linear layer (with a following ReLU fused) and batched matmul becomes a task; identical
layers are one task with a weight. Ansor's task scheduler spends --budget measurements
across the tasks where the model's time is predicted to fall most, each task searched
by the evolutionary search. Every measurement goes to the tuning database (--database),
so a later run on this machine reuses it: the budget counts the database's measurements
of these tasks, and a second run with the same budget measures nothing.

Then each layer's best kernel is timed against torch's call (a layer keeps torch where
torch is faster), the model is rebuilt with torch custom operators in place of its
layers, checked against the original on random inputs, and both are timed in
alternating blocks. Writes runs/model-<name>-<target>-<time>/: summary.json (the
per-task table), time.png (where the time goes) and config.json.

Examples:
  python -m experiments tune-model --model resnet18 --budget 200
  python -m experiments tune-model --model my_net.py:build --budget 64 --json
  python -m experiments apply --model resnet18        # the database's kernels, no tuning
"""

from __future__ import annotations

import statistics
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from .config import field

@dataclass
class ModelChoice:
    model: str = field(help="resnet18, resnet50, mobilenet_v2, bert_layer, or FILE.py:FACTORY (a function "
                            "of no arguments returning (module, example_input))")
    batch: int = field(1, help="batch size of a built-in model (a FILE.py:FACTORY gives its own input)")
    target: str = field("cpu", help="where to run (cuda: an NVIDIA GPU)", choices=["cpu", "cuda"])
    dtype: str = field("fp32", help="data type of the model and its kernels (tf32, bf16, fp16: on cuda; the "
                                    "model is converted, and torch runs in it too)",
                       choices=["fp32", "tf32", "bf16", "fp16"])
    database: str | None = field(None, help="the tuning database, one JSON-lines file (default: "
                                            "~/.cache/schedgym/tuning.jsonl, or under $SCHEDGYM_CACHE)",
                                 metavar="PATH")
    rounds: int = field(5, help="rounds of alternating blocks timing the model against torch")
    compile_baseline: bool = field(False, help="also time torch.compile of the original model")
    runs: str = field("runs", help="where run directories go")
    json: bool = field(False, help="print one JSON object as the last line")


@dataclass
class Config(ModelChoice):
    budget: int | None = field(None, help="hardware measurements in all, over all tasks, the database's "
                                          "included (default: 16 per task)")
    cluster: str | None = field(None, help="measure on the Ray cluster at this address (auto, HEAD_IP:6379, "
                                           "local)", metavar="ADDRESS")
    seed: int = field(0, help="random seed (weights of built-in models and the search)")


def prepare(cfg: ModelChoice):
    """(name, module, example inputs, target, database path), every input checked first."""
    from kernels.codegen.rules import check_dtype
    from kernels.target import get_target
    from models import database
    from models.runtime import TORCH_DTYPES
    from models.zoo import load_model

    check_dtype(cfg.dtype, cfg.target)
    if cfg.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    target = get_target(cfg.target)     # no GPU: one line, before anything is built
    db = database.check_path(cfg.database) if cfg.database else database.default_path()
    name, module, example = load_model(cfg.model, cfg.batch, getattr(cfg, "seed", 0))
    if ":" in cfg.model and cfg.batch != 1:
        print(f"note: --batch does not apply to {cfg.model}; its factory gives the input", file=sys.stderr)
    if target.kind == "cuda":
        import torch
        # torch computes in the same dtype: fp32 without TF32 (its convolutions would
        # otherwise use TF32 tensor cores), TF32 where the kernels use it
        torch.backends.cuda.matmul.allow_tf32 = torch.backends.cudnn.allow_tf32 = cfg.dtype == "tf32"
        torch.backends.cudnn.benchmark = True           # its fastest algorithms: a fair bar
        dtype = TORCH_DTYPES[cfg.dtype]
        module = module.to("cuda", dtype)
        example = tuple(t.to("cuda", dtype) if t.is_floating_point() else t.cuda() for t in example)
    return name, module, example, target, db


def _policy_for(target):
    from . import pretrained

    cache = {}

    def policy(op):
        if op.kind not in cache:    # loaded once per operator kind
            cache[op.kind] = pretrained.shipped_policy(op, target)
        return cache[op.kind]
    return policy


def run(cfg: Config) -> dict:
    from kernels.measure import Measurer, cluster
    from models.scheduler import TaskScheduler
    from models.tasks import extract

    from . import pretrained
    from .progress import Progress

    name, module, example, target, db = prepare(cfg)
    net = extract(module, example, cfg.dtype)
    tasks = net.tasks()
    budget = 16 * len(tasks) if cfg.budget is None else cfg.budget
    if budget < 0:
        raise ValueError("--budget must not be negative")
    print(f"{name}: {len(net.sites)} layers as {len(tasks)} tasks; database {db}", file=sys.stderr)
    backend = cluster.join(cfg.cluster, target) if cfg.cluster else None
    t0 = time.perf_counter()
    with Measurer(target, backend and backend.builder, backend and backend.runner, log=db) as measurer:
        model = pretrained.load_cost_model(None, target, seed=cfg.seed, dtype=cfg.dtype)
        scheduler = TaskScheduler(tasks, measurer, model, _policy_for(target), seed=cfg.seed)
        todo = max(0, budget - scheduler.known)
        print(f"{scheduler.known} measurements of these tasks already in the database; {todo} to make",
              file=sys.stderr)
        bar = Progress(todo, f"tune-model {name}")
        task_bar: list[Progress] = []     # the bar of the task being tuned

        def chunk(task, n: int) -> None:
            if task_bar:
                task_bar.pop().close()
            task_bar.append(Progress(task.spent + n, f"  {task.op.kind} {task.op.shape_str} (x{task.weight})",
                                     initial=task.spent))

        def measured(task) -> None:
            bar.update(1)
            task_bar[-1].update(1, best_ms=f"{task.best_ms:.3f}")
        scheduler.on_chunk, scheduler.on_measure = chunk, measured
        made = scheduler.run(budget) if todo else 0
        for b in task_bar:
            b.close()
        bar.close()
        tune_wall_s = time.perf_counter() - t0
        summary = report(cfg, name, module, example, measurer, net)
    summary.update(measurements=made, tune_wall_s=round(tune_wall_s, 1), budget=budget)
    _save(summary)
    return summary


def report(cfg: ModelChoice, name: str, module, example, measurer, network=None) -> dict:
    """Build the tuned model from the database, check it, time it against torch; print the
    per-task table; write the run directory. The summary (the JSON line)."""
    from models.compile import CompileError, compile_model
    from models.runtime import time_alternating, tuned_module

    from .runs import new_run_dir, save_config

    print("timing each layer's kernel against torch ...", file=sys.stderr)
    target = measurer.target
    run_dir = new_run_dir(cfg.runs, "model", name, target.kind)
    save_config(run_dir, cfg)
    summary = {"model": name, "batch": cfg.batch, "target": target.kind, "hardware": target.device,
               "dtype": cfg.dtype, "run_dir": str(run_dir)}
    try:
        compiled = compile_model(module, example, measurer, dtype=cfg.dtype, network=network)
    except CompileError as e:
        print(f"error: {e}", file=sys.stderr)
        return {**summary, "correct": False, "tasks": None, "model_ms": None, "torch_ms": None,
                "speedup_vs_torch": None, "folded_ms": None, "speedup_vs_folded": None}
    layers = compiled.layers
    # "folded": our traced graph (BN folded into the convolutions) with torch's kernels, so
    # that what the tuned kernels bring is told apart from what the folding brings
    folded = tuned_module(compiled.network, {})
    fns = {"torch": lambda: module(*example), "folded": lambda: folded(*example),
           "tuned": lambda: compiled.module(*example)}
    if cfg.compile_baseline:
        import torch
        reference = torch.compile(module)   # compiled on its first (warm-up) call
        fns["torch_compile"] = lambda: reference(*example)
    print(f"timing the model against torch ({cfg.rounds} rounds of alternating blocks) ...", file=sys.stderr)
    device = next(iter(example)).device
    times = time_alternating(fns, device, rounds=cfg.rounds, block_s=0.5)
    ratio = statistics.median(a / b for a, b in zip(times["torch"], times["tuned"]))
    summary.update(
        tasks=len(layers), correct=True,
        model_ms=statistics.median(times["tuned"]), model_spread_ms=max(times["tuned"]) - min(times["tuned"]),
        torch_ms=statistics.median(times["torch"]), torch_spread_ms=max(times["torch"]) - min(times["torch"]),
        speedup_vs_torch=ratio,
        layers_tuned=sum(layer.used for layer in layers), layers=[layer.to_json() for layer in layers])
    summary["folded_ms"] = statistics.median(times["folded"])
    summary["speedup_vs_folded"] = statistics.median(a / b for a, b in zip(times["folded"], times["tuned"]))
    if "torch_compile" in times:
        summary["torch_compile_ms"] = statistics.median(times["torch_compile"])
        summary["speedup_vs_torch_compile"] = statistics.median(
            a / b for a, b in zip(times["torch_compile"], times["tuned"]))
    _print_table(summary)
    _plot(summary, run_dir / "time.png")
    return summary


def _save(summary: dict) -> None:
    import json
    if summary.get("run_dir"):
        Path(summary["run_dir"], "summary.json").write_text(json.dumps(summary, indent=2) + "\n")


def _fmt(x: float | None) -> str:
    return f"{x:9.3f}" if x is not None else f"{'-':>9}"


def _print_table(s: dict) -> None:
    print(f"{'task':<42} {'weight':>6} {'meas':>5} {'ours ms':>9} {'torch ms':>9}  runs")
    for layer in s["layers"]:
        print(f"{layer['op'] + ' ' + layer['shape']:<42} {layer['weight']:>6} {layer['measurements']:>5} "
              f"{_fmt(layer['ours_ms'])} {_fmt(layer['torch_ms'])}  "
              f"{'tuned' if layer['uses_tuned_kernel'] else 'torch (' + layer['note'] + ')'}")
    line = (f"{s['model']} batch {s['batch']} on {s['hardware']}: {s['model_ms']:.2f} ms (spread "
            f"{s['model_spread_ms']:.2f}) against torch eager {s['torch_ms']:.2f} ms (spread {s['torch_spread_ms']:.2f})"
            f": {s['speedup_vs_torch']:.2f}x; {s['layers_tuned']} of {len(s['layers'])} tasks run tuned kernels; "
            f"with batch norms folded but torch's kernels {s['folded_ms']:.2f} ms ({s['speedup_vs_folded']:.2f}x)")
    if "torch_compile_ms" in s:
        line += f"; torch.compile {s['torch_compile_ms']:.2f} ms ({s['speedup_vs_torch_compile']:.2f}x)"
    print(line)
    print(f"run directory: {s['run_dir']}")


def _plot(s: dict, path: Path) -> None:
    """Horizontal bars: each task's time in the model (weight x ms), torch's and ours."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    layers = sorted(s["layers"], key=lambda r: -(r["torch_ms"] or 0) * r["weight"])[:30]
    labels = [f"{r['op']} {r['shape']} x{r['weight']}" for r in layers]
    torch_ms = [(r["torch_ms"] or 0) * r["weight"] for r in layers]
    ours = [(r["ours_ms"] or 0) * r["weight"] for r in layers]
    fig, ax = plt.subplots(figsize=(9, 1.5 + 0.28 * len(layers)))
    y = range(len(layers))
    ax.barh([i + 0.2 for i in y], torch_ms, height=0.4, label="torch")
    ax.barh([i - 0.2 for i in y], ours, height=0.4, label="tuned kernel")
    ax.set_yticks(list(y), labels, fontsize=7)
    ax.invert_yaxis()
    ax.set_xlabel("ms per model call (weight x layer time)")
    ax.set_title(f"{s['model']} batch {s['batch']}, {s['hardware']}: {s['model_ms']:.2f} ms tuned, "
                 f"{s['torch_ms']:.2f} ms torch eager", fontsize=9)
    ax.legend()
    fig.tight_layout()
    fig.savefig(path, dpi=110)
    plt.close(fig)
