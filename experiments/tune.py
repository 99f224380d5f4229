"""Tune one operator shape with at most --budget hardware measurements.

Agents: evolve (default: Ansor's evolutionary search guided by the learned cost
model; a shipped or given policy proposes its population; where none is, or with
--no-expert, sketches of the operator (agents/sketch.py, CPU) and random rollouts),
ppo (a trained policy's samples ranked by the cost model, zero-shot), and the
baselines random, filtered (random candidates, the cost model's predicted best
measured), anneal (simulated annealing guided by the cost model) and beam. The
naive kernel, the expert schedule (unless --no-expert) and the library are timed as
references outside the budget; the result is never slower than the naive kernel or
the expert.

Everything goes to runs/<op>-<target>-<agent>-<seed>-<time>/ (TensorBoard events,
tuning.jsonl, progress.jsonl, summary.json, best_kernel.c or .cu). --resume RUN_DIR goes
on from an interrupted run: measured schedules come back from its tuning log and
are not measured again. With --cluster on GPUs, one runner per GPU: the search proposes
the next batch while one is measured (README, "Measuring on several machines").

Examples:
  python -m experiments tune --op matmul --shape 1024x1024x1024 --budget 64
  python -m experiments tune --op conv2d --shape 1,64,56,56,64,3,3,1,1 --agent anneal --budget 128
  python -m experiments tune --op matmul --shape 1024x1024x1024 --target cuda --budget 64
  python -m experiments tune --op matmul --shape 1024x1024x1024 --target cuda --budget 256 --cluster local --gpus 2
  tensorboard --logdir runs
"""

from __future__ import annotations

import json
import statistics
import sys
from dataclasses import dataclass, replace
from pathlib import Path

import numpy as np

from agents.search import AGENTS, Search
from agents.search import Progress as SearchProgress
from kernels.measure import cluster
from kernels.measure import Measurer
from kernels.experts import expert_schedule
from kernels.measure.comparison import Comparison, compare_with_library, paired_ratio, speedups_over
from kernels.measure.library import library_name, library_time_ms
from kernels.measure.runner import check_fits_in_memory
from kernels.codegen.rules import check_dtype
from kernels.ir.dtypes import DTYPES
from kernels.ir.ops import OPERATORS, make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule
from kernels.target import get_target

from . import pretrained
from .bench import export_kernel
from .config import field
from .progress import Progress
from .runs import ProgressLog, new_run_dir, resumed_config, save_config


@dataclass
class Config:
    op: str | None = field(None, help="operator (required, unless --resume); your own are declared in files listed "
                                 "in $SCHEDGYM_OPERATORS (README, \"Adding an operator\")", choices=list(OPERATORS))
    shape: str | None = field(None, help="extents, e.g. 1024x1024x1024 or N,C,H,W,K,R,S[,stride[,pad]] "
                                         "(required, unless --resume)")
    target: str = field("cpu", help="where to run (cuda: an NVIDIA GPU through CuPy)", choices=["cpu", "cuda"])
    dtype: str = field("fp32", help="data type: fp32, tf32 (fp32 storage, tensor-core math), bf16 or fp16 "
                                    "(fp32 accumulation); all but fp32 need --target cuda", choices=list(DTYPES))
    agent: str = field("evolve", help="search agent: evolve (evolutionary search guided by the cost model, "
                                      "proposals from the policy where one exists), ppo (the policy's "
                                      "samples ranked by the cost model), or a baseline", choices=list(AGENTS))
    policy: str | None = field(None, help="trained policy for evolve and ppo: its .pt, with the .json beside it "
                                          "(default: the shipped one, if any)", metavar="PATH")
    no_expert: bool = field(False, help="an ablation: the expert schedule is no candidate and no seed, and the "
                                        "shipped policy (which imitates it) proposes nothing unless --policy "
                                        "names one (the search starts from sketches of the operator and random "
                                        "rollouts); the expert is still timed in the final comparison, for the figure")
    cost_model: str | None = field(None, help="pre-trained cost model of the guided searches (every agent but "
                                              "random; default: the shipped one)", metavar="PATH")
    budget: int | None = field(None, help="hardware measurements the search may make, in all "
                                          "(default: 64, or the resumed run's)")
    seed: int = field(0, help="random seed")
    runs: str = field("runs", help="where run directories go")
    resume: str | None = field(None, help="continue the run in this directory", metavar="RUN_DIR")
    export: str | None = field(None, help="write the best kernel's .c, .so and .json here", metavar="DIR")
    cluster: str | None = field(None, help="measure on the Ray cluster at this address: auto, HEAD_IP:6379, "
                                           "or local (a throwaway one on this machine)", metavar="ADDRESS")
    gpus: int | None = field(None, help="with --cluster local: start it with this many of this machine's GPUs "
                                        "(default: all), one runner each", metavar="K")
    batch: int = field(0, help="candidates proposed and measured at once (0: 8, or the cluster's devices where "
                               "more); a seeded search with the same batch measures the same records on any cluster")
    rounds: int = field(3, help="rounds of the final comparison with the library (alternating blocks)")
    json: bool = field(False, help="print one JSON object as the last line")


DEFAULT_BUDGET = 64
CONTENDERS = 4   # the search's fastest kernels timed again beside the expert before the final rounds


def _library_ms(op, measurer: Measurer) -> float:
    """The library's time on this target: in this process on a CPU; on a GPU in the
    measurement worker, which holds the device (beside the naive kernel)."""
    if measurer.target.kind == "cpu":
        return library_time_ms(op, op.random_inputs(np.random.default_rng(0)))
    naive = render(Schedule(op), measurer.target)
    res = measurer.runner.run(op, naive, measurer.builder.build([naive])[0].path, library=True)
    if not res.ok:
        raise RuntimeError(f"the naive {op.kind} kernel failed on {measurer.target.device}: {res.error}")
    return statistics.median(res.library_times_ms)


def _final_comparison(op, target, measurer: Measurer, ranked: list[tuple[float, Schedule]],
                      expert: Schedule | None, rounds: int, expert_wins: bool = True, library: bool = True):
    """The best kernel re-checked and re-timed against the library (where ``library``): ``(schedule,
    kernel, built, its comparison, the expert's time in ms or None, fraction of the expert or None,
    the search's time of it, re-measured?)``. On a GPU the expert is timed in the same rounds;
    on a CPU the two are timed in turn (``paired_ratio``), the expert's time that ratio of the
    best's, and the expert takes rounds of its own only where it is the result.

    On a CPU the search's fastest few are first timed again in turn with the expert and
    the fastest of them goes first (``_retimed``). The tuning log is data, not truth: a
    best that fails its re-check is dropped and the next best takes its place. A final
    time that disagrees with the search's by more than the spread (a machine loaded in
    one of the two) is measured once more, and said, where the search timed kernels alone
    (not paired with the expert). Where the expert is
    faster (the search timed its best too kindly), the expert is the result, never slower
    than the expert, unless ``expert_wins`` is off (the ablation, where the expert is timed
    only for the figure)."""
    extra = []
    if expert is not None:
        expert_kernel = render(expert, target, name=f"{op.kind}_expert")
        expert_built = measurer.builder.build([expert_kernel])[0]
        extra = [(expert_kernel, expert_built.path)] if expert_built.ok else []
        if extra and not expert_kernel.is_cuda:
            ranked = _retimed(op, target, measurer, ranked, expert)
    for searched_ms, schedule in ranked:
        kernel = render(schedule, target)
        built = measurer.builder.build([kernel])[0]
        if not built.ok:
            continue
        is_expert = bool(extra) and schedule.kernel_key() == expert.kernel_key()
        beside = extra if kernel.is_cuda and not is_expert else []
        cmp, *rest = compare_with_library(measurer.runner, op, [(kernel, built.path), *beside], target, rounds,
                                          library)
        remeasured = False
        # a paired search's times are in the expert's units, not comparable with the rounds'
        if cmp.ok and not measurer.paired(op) and not cmp.agrees_with(searched_ms):
            print(f"the final timing ({cmp.time_ms:.3f} ms) disagrees with the search's ({searched_ms:.3f} ms) "
                  f"by more than its spread; measuring again", file=sys.stderr)
            cmp, *rest = compare_with_library(measurer.runner, op, [(kernel, built.path), *beside], target, rounds,
                                              library)
            remeasured = True
        if cmp.ok:
            of_expert = None
            if is_expert:
                of_expert = 1.0
            elif extra and kernel.is_cuda:   # CUDA events time each launch on its own: the rounds
                of_expert = _ratio(rest[0], cmp) if rest[0].ok else None
            elif extra:   # on a CPU the two timed in turn, which rounds a second apart cannot match on a shared host
                of_expert = paired_ratio(measurer.runner, op, (kernel, built.path), extra[0])
            if expert_wins and of_expert is not None and of_expert < 1:
                print(f"the expert schedule is faster ({1 / of_expert:.3f} of the best's speed); it is the result",
                      file=sys.stderr)
                expert_cmp = rest[0] if rest else compare_with_library(measurer.runner, op, extra, target, rounds,
                                                                       library)[0]
                if expert_cmp.ok:
                    return (expert, expert_kernel, expert_built, expert_cmp, expert_cmp.time_ms, 1.0, searched_ms,
                            remeasured)
            if rest and rest[0].ok:   # the GPU's rounds
                expert_ms = rest[0].time_ms
            else:   # the CPU's pairs: that ratio of the best's time
                expert_ms = cmp.time_ms * of_expert if of_expert else None
            return schedule, kernel, built, cmp, expert_ms, of_expert, searched_ms, remeasured
        print(f"warning: the best kernel of the search failed its final check ({cmp.error}); "
              "taking the next", file=sys.stderr)
    raise LookupError(f"no kernel passed the final check among {len(ranked)} correct measurements")


def _retimed(op, target, measurer: Measurer, ranked: list[tuple[float, Schedule]],
             expert: Schedule) -> list[tuple[float, Schedule]]:
    """``ranked`` with its first ``CONTENDERS`` distinct kernels re-ordered by a fresh timing
    in turn with the expert (CPU), fastest first; one that fails goes last. The fastest of
    many noisy timings was timed too kindly (the winner's curse): a contender a little
    slower in the search is often the faster kernel."""
    head, keys = [], set()
    for ms, schedule in ranked:
        if len(head) == CONTENDERS:
            break
        if schedule.kernel_key() not in keys:
            keys.add(schedule.kernel_key())
            head.append((ms, schedule))
    if len(head) < 2:
        return ranked
    others = [s for _, s in head if s.kernel_key() != expert.kernel_key()]
    timed = dict(zip((s.kernel_key() for s in others),
                     speedups_over(op, others, expert, target, measurer, rounds=1)))
    speedups = [timed.get(s.kernel_key(), 1.0) for _, s in head]
    order = sorted(range(len(head)), key=lambda i: (-speedups[i], head[i][0]))
    return [head[i] for i in order] + [(ms, s) for ms, s in ranked if s.kernel_key() not in keys]


def _expert(op, target) -> Schedule | None:
    try:
        return expert_schedule(op, target)
    except ValueError:
        return None


def _measurements_to_90pct(history, final_ms: float, expert, of_expert: float | None, naive) -> int | None:
    """Measurements the search took to come within 90% of the speed of the kernel it returned, 0
    where a reference (naive, expert) already was; None if never. The target is the returned
    kernel's re-measured figure in the search's units (the expert's search time over the final
    ratio to it), not the search's fastest sample: that maximum of noisy timings is biased up,
    and counting to 90% of a lucky sample counts how long until the next lucky one."""
    final = expert.time_ms / of_expert if expert is not None and expert.ok and of_expert else final_ms
    target = final / 0.9
    if any(r is not None and r.ok and r.time_ms <= target for r in (naive, expert)):
        return 0
    return next((p.measurements for p in history if p.best_time_ms <= target), None)


def _ratio(slower: Comparison | None, faster: Comparison) -> float | None:
    """Median over rounds of ``slower``'s time / ``faster``'s (timed in the same rounds)."""
    if slower is None or not slower.ok:
        return None
    return statistics.median(a.time_ms / b.time_ms for a, b in zip(slower.rounds, faster.rounds))


def _policy(cfg: Config, op, target):
    """The policy for evolve (optional: without one it proposes sketches and random rollouts) and ppo
    (required)."""
    if cfg.agent == "ppo" or (cfg.agent == "evolve" and cfg.policy):
        return pretrained.load_policy(cfg.policy, op, target)
    return pretrained.shipped_policy(op, target) if cfg.agent == "evolve" and not cfg.no_expert else None


def run(cfg: Config) -> dict:
    if cfg.resume:
        cfg = resumed_config(cfg, keep=("json", "export", "cluster", "gpus", "budget", "rounds"),
                             identity=("op", "shape"))
    if cfg.op is None or cfg.shape is None:
        raise ValueError("tune needs --op and --shape (or --resume RUN_DIR)")
    cfg = replace(cfg, budget=DEFAULT_BUDGET if cfg.budget is None else cfg.budget)
    if cfg.budget < 1:
        raise ValueError("--budget must be at least 1")
    if cfg.rounds < 1:
        raise ValueError("--rounds must be at least 1")
    op = make_op(cfg.op, cfg.shape, cfg.dtype)
    check_dtype(op.dtype, cfg.target)
    check_fits_in_memory(op)
    target = get_target(cfg.target)
    policy = _policy(cfg, op, target)
    policy_file = (cfg.policy or str(pretrained.policy_path(op, target.kind))) if policy is not None else None
    model = None
    if cfg.agent in ("evolve", "ppo", "filtered", "anneal", "beam"):
        model = pretrained.load_cost_model(cfg.cost_model, target, seed=cfg.seed, dtype=op.dtype)
    expert = _expert(op, target)

    from torch.utils.tensorboard import SummaryWriter

    if cfg.batch < 0:
        raise ValueError("--batch must be at least 1 (or 0: sized to the cluster)")
    # fails fast, before a run dir
    backend = cluster.join(cfg.cluster, target, cfg.gpus) if cfg.cluster or cfg.gpus else None
    run_dir = Path(cfg.resume) if cfg.resume else new_run_dir(cfg.runs, op.kind, target.kind, cfg.agent, cfg.seed)
    writer = SummaryWriter(str(run_dir))
    save_config(run_dir, cfg, writer)
    progress = ProgressLog(run_dir, writer)
    print(f"run directory: {run_dir}", file=sys.stderr)
    if policy_file:
        print(f"proposals from the policy {policy_file}", file=sys.stderr)

    with Measurer(target, backend and backend.builder, backend and backend.runner,
                  log=run_dir / "tuning.jsonl") as measurer:
        already = len(measurer.cache)
        # references, outside the budget: the result is never slower than either
        reference = None if cfg.no_expert else expert
        if reference is not None and target.kind == "cpu":
            # every kernel the search measures (the references too) timed in turn with the expert,
            # in units of its time; its name is that of the final comparison's expert: built once
            measurer.pair_with_schedule(op, reference, name=f"{op.kind}_expert")
        naive, expert_result = measurer.measure([Schedule(op), reference or Schedule(op)])
        # for the curve; the final figure times the library against the best kernel, in blocks
        library = library_name(op, target.kind)
        library_ms_start = _library_ms(op, measurer) if library else None
        bar = Progress(cfg.budget, f"{cfg.agent} {op.kind} {op.shape_str}")

        def on_progress(p: SearchProgress) -> None:
            bar.update(1, best_gflops=f"{p.best_gflops:.1f}")
            speedup = naive.time_ms / p.best_time_ms if naive.ok and p.best_time_ms < float("inf") else 0.0
            scalars = {"search/best_gflops": p.best_gflops, "search/best_speedup": speedup,
                       "search/wall_time_s": p.wall_s}
            if library_ms_start:
                scalars["search/fraction_of_library"] = library_ms_start / p.best_time_ms
            progress.add(p.measurements, **scalars)

        # a cluster of GPUs measures the next batch as soon as a device is free (Search says what that changes)
        search = Search(op, target, measurer, cfg.budget, on_progress=on_progress,
                        batch=cfg.batch or max(8, backend.parallelism if backend else 0),
                        pipeline=bool(backend and backend.pipelined),
                        reference_ms=min((r.time_ms for r in (naive, expert_result) if r.ok), default=None),
                        references=frozenset(s.kernel_key() for s in (Schedule(op), reference) if s is not None))
        rng = np.random.default_rng(cfg.seed)
        AGENTS[cfg.agent](search, rng, model=model, policy=policy)
        bar.close()
        ranked = sorted([(r.time_ms, search.schedules[k]) for k, r in search.measured.items() if r.ok]
                        + [(r.time_ms, sch) for sch, r in ((Schedule(op), naive), (reference, expert_result))
                           if sch is not None and r.ok], key=lambda x: x[0])
        if not ranked:
            raise LookupError(f"no correct kernel in {len(search.measured)} measurements")
        best, kernel, built, final, expert_ms, of_expert, searched_ms, remeasured = _final_comparison(
            op, target, measurer, ranked, expert, cfg.rounds, expert_wins=not cfg.no_expert, library=bool(library))
        best = best.simplified()   # what the user reads: the same kernel, its cancelling reorders gone
        if cfg.export:
            export_kernel(cfg.export, kernel, built.path, best, target)
    writer.close()

    library_ms = final.library_time_ms
    summary = {
        "op": op.kind, "shape": op.shape_str, "dtype": op.dtype, "target": target.kind, "hardware": target.device,
        "agent": cfg.agent, "policy": policy_file, "budget": cfg.budget, "measurements": len(search.measured),
        "resumed_records": already,
        "time_ms": final.time_ms, "time_spread_ms": final.time_spread_ms, "search_time_ms": searched_ms,
        "gflops": op.flops / final.time_ms / 1e6,
        "library": library, "library_time_ms": library_ms,
        "library_spread_ms": final.library_spread_ms,
        "library_gflops": op.flops / library_ms / 1e6 if library_ms else None,
        "fraction_of_library": final.fraction_of_library, "rounds": len(final.rounds), "remeasured": remeasured,
        "expert_gflops": op.flops / expert_ms / 1e6 if expert_ms else None,
        "fraction_of_expert": of_expert,
        "measurements_to_90pct": _measurements_to_90pct(
            search.history, final.time_ms, expert_result if reference is not None else None, of_expert, naive),
        "naive_time_ms": naive.time_ms,
        "speedup_vs_naive": naive.time_ms / final.time_ms if naive.ok else None,
        "correct": True, "best_schedule": best.steps_json(),
        "wall_s": search.history[-1].wall_s if search.history else 0.0, "run_dir": str(run_dir),
        "batch": search.batch, "pipelined": search.pipeline,
    }
    if backend:
        summary["cluster"] = backend.summary()
    (run_dir / "summary.json").write_text(json.dumps(summary, indent=2) + "\n")
    (run_dir / "best.json").write_text(json.dumps(best.to_json(), indent=2) + "\n")
    (run_dir / f"best_kernel.{'cu' if kernel.is_cuda else 'c'}").write_text(kernel.source)
    print(f"{op.kind} {op.shape_str}: best {summary['gflops']:.1f} GFLOPS ({final.time_ms:.3f} ms, spread "
          f"{final.time_spread_ms:.3f}) after {summary['measurements']} measurements, "
          f"{summary['speedup_vs_naive'] or 0:.1f}x naive, "
          + (f"{final.fraction_of_library:.2f} of {library} " if library else "no library to compare with ")
          + f"(median of {len(final.rounds)} rounds of alternating blocks)"
          + (f", {summary['fraction_of_expert']:.2f} of the expert" if summary["fraction_of_expert"] else ""))
    print(f"best schedule: {run_dir / 'best.json'}; log: {run_dir / 'tuning.jsonl'}")
    return summary
