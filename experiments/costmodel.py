"""Train the learned cost model from tuning logs; optionally measure random schedules first.

Trains on every correct record of ``--logs`` for ``--target``, holding out a fifth
of each (op, shape) group's schedules, and reports held-out pairwise ranking
accuracy (the fraction of same-shape pairs ordered like the measurements) and
top-k recall (how many of the k truly fastest are among the k predicted fastest).
With several shapes it also trains on some shapes and tests on the others (each
shape held out in turn, up to 5 folds). The saved model is the one the held-out
figures describe.

Writes runs/costmodel-<target>-<arch>-<seed>-<time>/: config.json, metrics.json (what
--json prints) and TensorBoard events (cost_model/*; --tensorboard DIR puts them
elsewhere); the model goes to --out.

``--generate OP:SHAPE:N ...`` first measures N legal schedules of each shape into
``--logs-out DIR/OP_SHAPE.jsonl``: the expert schedule and mutations of it for about
half, random rollouts for the rest (``sample_schedules``); a rerun finds them in the
log and measures only what is missing. ``--shape-set NAME`` does the same for every
shape of a named set of ``experiments/shapes.py`` (``ranking``: 90 shapes of the five
operators), ``--per-shape`` schedules each.

``--eval LOG ...`` trains nothing: it reports how well ``--model`` (default: the
shipped one) ranks the correct records of the given logs.

``--target cuda`` does the same with a GPU's records (``--shape-set ranking-gpu``: 16
matmul and 16 conv2d shapes of the GPU's train families); measuring needs the GPU,
training and ``--eval`` run anywhere. The shipped model of a target and dtype
(``experiments/pretrained/<target>/cost_model[-<dtype>].pt``) is the one ``tune`` starts from.

Examples:
  python -m experiments costmodel --logs runs/a/tuning.jsonl --out runs/costmodel.pt --json
  python -m experiments costmodel --eval runs/*/tuning.jsonl --json
  python -m experiments costmodel --generate matmul:256x256x256:200 conv2d:1,32,28,28,32,3,3,1,1:150 \\
      --logs-out /tmp/cm_data --out /tmp/cm_data/model.pt --compare
  python -m experiments costmodel --shape-set ranking --per-shape 100 --logs-out data/ranking --out model.pt
  python -m experiments costmodel --target cuda --shape-set ranking-gpu --per-shape 24 --logs-out data/gpu \
      --out experiments/pretrained/cuda/cost_model.pt
"""

from __future__ import annotations

import copy
import json
import math
import sys
import time
import zlib
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from kernels.codegen.rules import check_dtype
from kernels.ir.dtypes import DTYPES
from kernels.ir.ops import make_op
from kernels.measure import Measurer, Runner
from kernels.target import get_target, target_or_description

from . import pretrained
from .config import field, jsonable
from .runs import new_run_dir, save_config


@dataclass
class Config:
    logs: list[str] | None = field(None, help="tuning logs (JSON lines) to train on", nargs="+", metavar="LOG")
    out: str | None = field(None, help="where to save the trained model", metavar="MODEL")
    epochs: int = field(30, help="training epochs (more fit the training shapes better and others worse)")
    seed: int = field(0, help="seed of the initial weights, the held-out split and the sampled schedules")
    holdout: float = field(0.2, help="fraction of each shape's schedules held out for the metrics")
    top_k: int = field(10, help="k of the top-k recall")
    arch: str = field("set", help="network over the features: set (per-loop rows, pooled) or mlp (flat)",
                      choices=["set", "mlp"])
    compare: bool = field(False, help="also train the other architecture and report both")
    tensorboard: str | None = field(None, help="write cost_model/* scalars of the held-out metrics here "
                                                "(default: the run directory)", metavar="DIR")
    target: str = field("cpu", help="train on records of this target (cuda: without a GPU for an H200's "
                                    "description; measuring, --generate or --shape-set, needs one)",
                        choices=["cpu", "cuda"])
    dtype: str = field("fp32", help="train on records of this dtype, and measure schedules in it (all but "
                                    "fp32 need --target cuda)", choices=list(DTYPES))
    generate: list[str] | None = field(None, help="measure N schedules of each OP:SHAPE:N first",
                                       nargs="+", metavar="OP:SHAPE:N")
    shape_set: str | None = field(None, help="measure --per-shape schedules of every shape of this set "
                                             "(experiments/shapes.py) first", metavar="NAME")
    per_shape: int = field(100, help="schedules per shape of --shape-set")
    logs_out: str | None = field(None, help="directory for the logs --generate writes", metavar="DIR")
    max_steps: int = field(10, help="most steps of a generated schedule")
    timeout: float = field(10.0, help="seconds a generated kernel may run (check and timing) before it "
                                      "counts as failed")
    eval: list[str] | None = field(None, help="only evaluate --model on the correct records of these logs "
                                               "(no training): pairwise accuracy and top-k recall",
                                   nargs="+", metavar="LOG")
    model: str | None = field(None, help="the model --eval evaluates (default: the shipped one for --target)",
                              metavar="PATH")
    runs: str = field("runs", help="where run directories go")
    json: bool = field(False, help="print one JSON object as the last line")


def _status(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def parse_spec(spec: str) -> tuple[str, str, int]:
    """``OP:SHAPE:N`` -> (op, shape, n)."""
    parts = spec.split(":")
    if len(parts) != 3 or not parts[2].isdigit() or int(parts[2]) < 1:
        raise ValueError(f"--generate {spec!r}: expected OP:SHAPE:N, e.g. matmul:256x256x256:200")
    make_op(parts[0], parts[1])  # raises on a bad op or shape
    return parts[0], parts[1], int(parts[2])


def log_name(kind: str, shape: str, dtype: str = "fp32") -> str:
    suffix = "" if dtype == "fp32" else f"_{dtype}"
    return f"{kind}_{make_op(kind, shape).shape_str.replace(',', 'x')}{suffix}.jsonl"


def sample_schedules(op, n: int, rng: np.random.Generator, max_steps: int, target) -> list:
    """``n`` distinct legal schedules of ``op``: the expert schedule and chains of one to
    three mutations of it for about half (where a search spends its measurements, so the
    model learns to rank good kernels), random rollouts for the rest, half drawn over
    actions, half over primitives (variety; most are slow)."""
    from agents.evolution import legal, mutate
    from agents.rollout import random_schedules
    from kernels.experts import expert_schedule

    out: dict[str, object] = {}
    try:
        expert = legal(op, expert_schedule(op, target).steps, target)
    except ValueError:   # no expert for this operator
        expert = None
    if expert is not None:
        out[expert.key()] = expert
        for _ in range(20 * n):
            if len(out) >= (n + 1) // 2:
                break
            s = expert
            for _ in range(int(rng.integers(1, 4))):
                s = mutate(s, target, rng) or s
            out.setdefault(s.key(), s)
    episode = max_steps + 1   # a rollout's last action is done
    want = n - len(out)
    for s in random_schedules(op, want // 2, rng, episode, by="action", target=target):
        out.setdefault(s.key(), s)
    for s in random_schedules(op, 2 * (n - len(out)), rng, episode, by="primitive", target=target):
        if len(out) < n:
            out.setdefault(s.key(), s)
    return list(out.values())


def generate(specs: list[str], out_dir: str | Path, seed: int = 0, max_steps: int = 10,
             target: str = "cpu", repeats: int = 3, min_time_s: float = 0.05, timeout_s: float = 10.0,
             batch: int = 16, dtype: str = "fp32") -> list[dict]:
    """Measure ``sample_schedules`` of each ``OP:SHAPE:N`` into ``out_dir``; one summary per spec.

    The schedules of a spec depend only on ``seed``, the spec and ``max_steps``, so a
    rerun replays the same list and the log's cache skips what was measured. A kernel
    ten times slower than the best of its shape so far is timed by its one check call.
    """
    from agents.search import SLOW_FACTOR

    parsed = [parse_spec(s) for s in specs]
    tgt = get_target(target)
    out_dir = Path(out_dir)
    out_dir.mkdir(parents=True, exist_ok=True)
    summaries = []
    for kind, shape, n in parsed:
        op = make_op(kind, shape, dtype)
        rng = np.random.default_rng([seed, zlib.crc32(f"{kind}:{op.shape_str}".encode())])
        scheds = sample_schedules(op, n, rng, max_steps, tgt)
        path = out_dir / log_name(kind, shape, dtype)
        runner = Runner(repeats=repeats, min_time_s=min_time_s, timeout_s=timeout_s)
        t0, ok, best = time.perf_counter(), 0, math.inf
        with Measurer(tgt, runner=runner, log=path) as m:
            for i in range(0, len(scheds), batch):
                part = scheds[i:i + batch]
                res = m.measure(part, SLOW_FACTOR * best if math.isfinite(best) else None)
                ok += sum(r.ok for r in res)
                best = min([best] + [r.time_ms / 1e3 for r in res if r.ok])
                _status(f"{kind} {op.shape_str}: {i + len(part)}/{len(scheds)} measured, {ok} correct "
                        f"({time.perf_counter() - t0:.0f}s)")
            summaries.append({"op": kind, "shape": op.shape_str, "log": str(path), "schedules": len(scheds),
                              "correct": ok, "new_measurements": m.measured,
                              "seconds": round(time.perf_counter() - t0, 1)})
    return summaries


def throughput(model, schedules: list, min_s: float = 1.0) -> dict:
    """Predictions per second, featurization included, from an empty feature cache: on
    schedules whose loop nest is known (built step by step, as a search builds them)
    and on schedules rebuilt from their steps (the nest replayed too: each round on copies of
    the operators, whose nests are not remembered yet)."""
    from kernels.ir.schedule import Schedule

    out = {}
    for name, fresh in (("predict_per_s", False), ("predict_from_steps_per_s", True)):
        n, spent = 0, 0.0
        while schedules and spent < min_s and n < 50_000:
            ops: dict[int, object] = {}
            batch = [Schedule(ops.setdefault(id(s.op), copy.copy(s.op)), s.steps) for s in schedules] if fresh \
                else list(schedules)
            model.clear_cache()
            t0 = time.perf_counter()
            model.predict(batch)
            spent += time.perf_counter() - t0
            n += len(batch)
        out[name] = n / spent if spent else None
    return out


def _train_and_evaluate(cfg: Config, arch: str, records: list, groups: int, log_dir: str | None):
    from agents.cost_model import CostModelConfig, LearnedCostModel, cross_validate_by_shape

    mcfg = CostModelConfig(arch=arch, seed=cfg.seed)
    model = LearnedCostModel(mcfg, target_or_description(cfg.target))
    t0 = time.perf_counter()
    res = model.fit(records, epochs=cfg.epochs, holdout=cfg.holdout, seed=cfg.seed, k=cfg.top_k,
                    log_dir=log_dir)
    res["train_s"] = time.perf_counter() - t0
    if groups >= 2:
        cv = cross_validate_by_shape(records, mcfg, cfg.epochs, k=cfg.top_k, target=model.target)
        res["by_shape"] = cv
    return model, res


def _print_table(rows: list[tuple[str, dict]], k: int) -> None:
    print(f"{'arch':<6}{'split':<22}{'held out':>9}{'pairwise acc':>14}{f'top-{k} recall':>14}")
    for arch, r in rows:
        print(f"{arch:<6}{'by schedule':<22}{r['held_out']:>9}{r['pairwise_accuracy']:>14.3f}"
              f"{r['top_k_recall']:>14.3f}")
        if "by_shape" in r:
            cv = r["by_shape"]
            split = f"by shape ({cv['folds']} folds)"
            print(f"{arch:<6}{split:<22}{'':>9}{cv['pairwise_accuracy']:>14.3f}"
                  f"{cv['top_k_recall']:>14.3f}")


def evaluate(cfg: Config) -> dict:
    """The accuracy of a saved model on the records of given logs, shape by shape."""
    from agents.cost_model import LearnedCostModel, records_from_logs

    target = target_or_description(cfg.target)
    path = Path(cfg.model) if cfg.model else pretrained.cost_model_path(target.kind, cfg.dtype)
    if not path.is_file():
        raise FileNotFoundError(f"cost model {path} does not exist")
    model = LearnedCostModel.load(path, target=target)
    records = records_from_logs(cfg.eval, cfg.target, cfg.dtype)
    metrics = model.evaluate(records, k=cfg.top_k)
    used = sum(1 for r in records if r.correct and r.error is None)
    if not used or metrics["pairwise_accuracy"] != metrics["pairwise_accuracy"]:   # NaN: no pairs
        raise ValueError(f"no two correct records of one shape in {', '.join(cfg.eval)}: nothing to rank")
    summary = {"model": str(path), "logs": cfg.eval, "records": used, "k": cfg.top_k,
               "pairwise_accuracy": metrics["pairwise_accuracy"],
               f"top{cfg.top_k}_recall": metrics["top_k_recall"]}
    print(f"{path}: pairwise accuracy {summary['pairwise_accuracy']:.3f}, top-{cfg.top_k} recall "
          f"{metrics['top_k_recall']:.3f} on {used} correct records of {len(cfg.eval)} logs")
    return summary


def run(cfg: Config) -> dict:
    from agents.cost_model import records_from_logs, to_samples

    check_dtype(cfg.dtype, cfg.target)
    if cfg.eval:
        return evaluate(cfg)

    summary: dict = {}
    logs = list(cfg.logs or [])
    specs = list(cfg.generate or [])
    if cfg.shape_set:
        from .shapes import shape_set

        specs += [f"{op}:{shape}:{cfg.per_shape}" for op, shape in shape_set(cfg.shape_set)]
    if specs:
        if not cfg.logs_out:
            raise ValueError("--generate and --shape-set need --logs-out DIR for the logs they write")
        gen = generate(specs, cfg.logs_out, cfg.seed, cfg.max_steps, cfg.target, timeout_s=cfg.timeout,
                       dtype=cfg.dtype)
        summary["generated"] = gen
        logs += [g["log"] for g in gen if g["log"] not in logs]
        if not cfg.out:
            return _record(cfg, summary, _run_dir(cfg))
    if not logs:
        raise ValueError("nothing to train on: give --logs LOG ... (or --generate OP:SHAPE:N --logs-out DIR)")
    if not cfg.out:
        raise ValueError("--out MODEL is required: where to save the trained model")
    if cfg.epochs < 1:
        raise ValueError("--epochs must be at least 1")
    target = target_or_description(cfg.target)
    records = records_from_logs(logs, cfg.target, cfg.dtype)
    samples = to_samples(records, target.device)
    if not samples:
        raise ValueError(f"no usable records in {', '.join(logs)}: {len(records)} records of target "
                         f"{cfg.target} in {cfg.dtype}, none correct with a finite time")
    groups = len({s.group for s in samples})
    run_dir = _run_dir(cfg)
    _status(f"training on {len(samples)} correct records of {groups} shapes from {len(logs)} logs ...")

    arches = [cfg.arch] + ([a for a in ("set", "mlp") if a != cfg.arch] if cfg.compare else [])
    rows = []
    model = None
    for arch in arches:
        tensorboard = Path(cfg.tensorboard or run_dir)
        log_dir = str(tensorboard / f"costmodel_{arch}_seed{cfg.seed}" if cfg.compare else tensorboard)
        m, res = _train_and_evaluate(cfg, arch, records, groups, log_dir)
        rows.append((arch, res))
        if model is None:
            model = m
    model.save(cfg.out)
    main = rows[0][1]
    speed = throughput(model, [s.schedule for s in samples][:2000])
    _print_table(rows, cfg.top_k)
    print(f"model ({cfg.arch}) saved to {cfg.out}; predicts {speed['predict_per_s']:.0f} schedules/s "
          f"({speed['predict_from_steps_per_s']:.0f}/s replaying their steps)")
    summary.update({
        "records": len(samples), "records_read": len(records), "groups": groups, "arch": cfg.arch,
        "train": main["train"], "held_out": main["held_out"], "k": cfg.top_k,
        "pairwise_accuracy": main["pairwise_accuracy"], "top_k_recall": main["top_k_recall"],
        "by_shape": main.get("by_shape"), "train_s": main["train_s"], **speed, "out": str(cfg.out),
        "logs": logs,
    })
    if cfg.compare:
        summary["compare"] = {arch: {"pairwise_accuracy": r["pairwise_accuracy"],
                                     "top_k_recall": r["top_k_recall"], "by_shape": r.get("by_shape")}
                              for arch, r in rows}
    return _record(cfg, summary, run_dir)


def _run_dir(cfg: Config) -> Path:
    run_dir = new_run_dir(cfg.runs, "costmodel", cfg.target, cfg.arch, cfg.seed)
    save_config(run_dir, cfg)
    _status(f"run directory: {run_dir}")
    return run_dir


def _record(cfg: Config, summary: dict, run_dir: Path) -> dict:
    """``summary``, with its run directory, also written to ``metrics.json`` there."""
    summary["run_dir"] = str(run_dir)
    (run_dir / "metrics.json").write_text(json.dumps(jsonable(summary), indent=2) + "\n")
    return summary
