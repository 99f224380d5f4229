"""Train a MaskablePPO agent on an operator's shape family.

Episodes build schedules for shapes sampled from the family's train split (the
held-out split is never sampled). Before PPO, the policy imitates the expert
schedules replayed as environment actions on the train shapes (--imitation-epochs;
0 turns it off), so PPO starts from a sensible policy instead of from chance. With
--teacher-budget N an evolutionary search of N measurements then tunes each train
shape, proposals drawn from that policy, and the policy imitates, shape by shape, the
fastest kernel found where it beats the expert (expert iteration: what the search
found becomes what the policy proposes). --init POLICY starts from a shipped or trained
policy in place of the imitation of the experts. With
--reward surrogate (default) the learned cost model rewards each step and is updated
online from the measured final kernels; with --reward measure only measurements
reward, and with --reward measure_vs_expert only measurements against the shape's
expert kernel (returns log(T_expert / T)). Vectorised envs share one measurement
cache and tuning log.

Writes runs/<op>-<target>-ppo-<seed>-<time>/: policy.pt and policy.json (the weights,
and the spec they are rebuilt from: what the policy was trained for and how;
agents/policy.py), cost_model.pt, tuning.jsonl, teachers.jsonl (with --teacher-budget:
each searched shape's teacher schedule and its speedup over the expert), TensorBoard events (SB3's
scalars under rollout/ and train/, ours under search/ with hardware measurements as
the step). --resume RUN_DIR continues training from there without re-measuring; a
teacher search that was interrupted goes on with the shapes it had not searched.

Examples:
  python -m experiments train --op matmul --timesteps 4096
  python -m experiments train --op matmul --target cuda --shapes gpu --timesteps 0   # imitation only
  python -m experiments train --op conv2d --timesteps 0 --teacher-budget 32   # imitate what a search found
  python -m experiments train --op matmul --target cuda --dtype bf16 --shapes gpu-many --timesteps 0 \
      --teachers RUN_DIR/teachers.jsonl   # imitate the teachers a GPU machine's searches found, here

Imitation alone (--timesteps 0) measures nothing: --target cuda then works without a
GPU, for the description of an H200 (kernels.target.cuda_target_for_compile).
"""

from __future__ import annotations

import json
import math
import sys
import time
from dataclasses import dataclass, fields
from pathlib import Path

from envs import MAX_STEPS
from envs.reward import REWARDS
from kernels.measure import cluster
from kernels.measure import Measurer
from kernels.codegen.rules import check_dtype
from kernels.ir.dtypes import DTYPES
from kernels.ir.ops import OPERATORS
from kernels.target import NoCudaDevice, Target, cuda_target_for_compile, get_target

from . import pretrained
from .config import field
from .progress import Progress
from .runs import ProgressLog, new_run_dir, resumed_config, save_config
from .shapes import family


@dataclass
class Config:
    op: str | None = field(None, help="operator (required, unless --resume)", choices=list(OPERATORS))
    target: str = field("cpu", help="where to run (cuda: an NVIDIA GPU through CuPy)", choices=["cpu", "cuda"])
    dtype: str = field("fp32", help="data type: fp32, tf32 (fp32 storage, tensor-core math), bf16 or fp16 "
                                    "(fp32 accumulation); all but fp32 need --target cuda", choices=list(DTYPES))
    shapes: str = field("default", help="shape family (its train split), or 'small' for quick runs")
    agent: str = field("ppo", help="the learning agent", choices=["ppo"])
    timesteps: int = field(4096, help="environment steps to train for (0: imitation of the experts only, "
                                      "nothing measured)")
    reward: str = field("surrogate", help="reward mode of the environment (envs/reward.py)", choices=list(REWARDS))
    n_envs: int = field(0, help="vectorised environments (0: 2 on this machine; with --cluster, as many "
                                "candidates as the cluster measures at once)")
    n_steps: int = field(256, help="PPO rollout length per environment")
    batch_size: int = field(128, help="PPO minibatch size")
    learning_rate: float = field(3e-5, help="PPO learning rate (small: PPO fine-tunes the imitation policy)")
    width: int = field(64, help="units in each of the policy's and the value network's two hidden layers")
    ent_coef: float = field(0.0, help="PPO entropy bonus")
    kl_coef: float = field(0.0, help="PPO: charge each step's reward this times log pi(a|s) - log pi_0(a|s), "
                                     "pi_0 the policy PPO starts from (the imitation): a KL penalty that keeps "
                                     "PPO near the teacher's choices where the reward does not pay for leaving them")
    max_steps: int = field(MAX_STEPS, help="actions per episode")
    imitation_epochs: int = field(1500, help="at most this many epochs of imitating the experts' replays before "
                                                  "PPO: it stops once the greedy policy picks every expert action "
                                                  "(0: no imitation)")
    teacher_budget: int = field(0, help="after imitating the experts, search each train shape with this many "
                                        "measurements and imitate the fastest kernel found wherever it beats "
                                        "the expert by 3%% timed alternately (0: the experts alone)",
                                metavar="N")
    teachers: str | None = field(None, help="imitate the teachers recorded in this file (a run's teachers.jsonl, "
                                            "e.g. of a teacher search on a GPU machine) in place of their shapes' "
                                            "experts; with --teacher-budget only the other shapes are searched",
                                 metavar="FILE")
    init: str | None = field(None, help="start from this policy (a shipped or trained .pt, its .json beside it) "
                                        "instead of imitating the experts: PPO (and --kl-coef's penalty) "
                                        "fine-tunes it; its layer widths replace --width", metavar="POLICY")
    cost_model: str | None = field(None, help="pre-trained cost model (default: the shipped one)",
                                   metavar="PATH")
    seed: int = field(0, help="random seed")
    runs: str = field("runs", help="where run directories go")
    resume: str | None = field(None, help="continue the run in this directory", metavar="RUN_DIR")
    cluster: str | None = field(None, help="measure on the Ray cluster at this address: auto, HEAD_IP:6379, "
                                           "or local (a throwaway one on this machine)", metavar="ADDRESS")
    gpus: int | None = field(None, help="with --cluster local: start it with this many of this machine's GPUs "
                                        "(default: all), one runner each", metavar="K")
    json: bool = field(False, help="print one JSON object as the last line")


def _callback(progress: ProgressLog, measurer: Measurer, total: int):
    from stable_baselines3.common.callbacks import BaseCallback

    class SearchLogger(BaseCallback):
        """Logs measured episode results (search/*, step = hardware measurements) and a
        progress bar."""

        def _on_training_start(self) -> None:
            self.bar = Progress(total, "train", unit="step", initial=self.model.num_timesteps)
            self.best: dict[str, float] = {}

        def _on_step(self) -> bool:
            mean_best = sum(self.best.values()) / max(len(self.best), 1)
            self.bar.update(self.training_env.num_envs, mean_best_speedup=f"{mean_best:.1f}")
            for info in self.locals.get("infos", []):
                if "speedup" not in info:
                    continue
                shape = info["shape"]
                if info["correct"]:
                    self.best[shape] = max(self.best.get(shape, 0.0), info["speedup"])
                    self.logger.record_mean("search/episode_log_speedup", math.log(max(info["speedup"], 1e-9)))
                mean_best = sum(self.best.values()) / max(len(self.best), 1)
                progress.add(measurer.measured, **{"search/mean_best_speedup": mean_best,
                                                   "search/episode_speedup": info["speedup"]})
            return True

        def _on_training_end(self) -> None:
            self.bar.close()

    return SearchLogger()


def _command(cfg: Config) -> str:
    """The command line that reproduces this training run."""
    parts = ["python -m experiments train", f"--op {cfg.op}"]
    for f in fields(Config):
        value = getattr(cfg, f.name)
        if f.name not in ("op", "json", "resume", "runs") and value != f.default:
            parts.append(f"--{f.name.replace('_', '-')} {value}")
    return " ".join(parts)


def _target(cfg: Config) -> Target:
    """The machine to train for. Imitation alone measures nothing, so without a GPU a
    CUDA policy learns from the description of one (an H200's, ``cuda_target_for_compile``)."""
    try:
        return get_target(cfg.target)
    except NoCudaDevice as e:
        if cfg.timesteps or cfg.resume or cfg.teacher_budget:
            raise
        target = cuda_target_for_compile()
        print(f"{e}; imitation measures nothing, so the policy is trained for {target.device} "
              f"({target.sm_count} multiprocessors)", file=sys.stderr)
        return target


def _imitate(cfg: Config, agent, shapes: list[str], target: Target, teachers: dict, writer) -> None:
    from agents.imitation import demonstrations, imitate

    demos = demonstrations(cfg.op, teachers, target, cfg.max_steps, cfg.dtype)
    if len(demos[2]):
        bar = Progress(cfg.imitation_epochs, f"imitation of {len(teachers)} teachers", unit="epochs")
        try:
            accuracy = imitate(agent, demos, cfg.imitation_epochs, cfg.seed,
                               on_check=lambda epoch, acc: bar.update(epoch - bar.n, greedy_accuracy=f"{acc:.2f}"))
        finally:
            bar.close()
        writer.add_scalar("train/imitation_accuracy", accuracy, 0)
        print(f"imitation: {len(demos[2])} actions of {len(teachers)} teachers on {len(shapes)} shapes, "
              f"greedy accuracy {accuracy:.2f}", file=sys.stderr)


def _search_teachers(cfg: Config, shapes: list[str], target: Target, measurer, cost_model, proposals,
                     taught: dict, record: Path, searched: frozenset[str] = frozenset()) -> dict[str, float]:
    """Replaces ``taught``'s experts by the kernels the teacher searches found, shape by shape
    (all but the ``searched`` ones, whose teachers an interrupted run recorded); returns
    each shape's best speedup over its expert, and appends each teacher's schedule to
    ``record`` (so what the searches found can be read and imitated again, and a resumed
    run goes on where this one stopped). Interrupted (Ctrl-C), it keeps the teachers found
    so far, and the shapes not yet searched keep their experts."""
    from agents.imitation import MARGIN, search_teachers

    speedups = {}
    left = len([s for s in shapes if s not in searched])
    bar = Progress(cfg.teacher_budget * left, f"teacher search {cfg.op}")
    try:
        for shape, teacher, speedup in search_teachers(cfg.op, shapes, target, measurer, cost_model, proposals,
                                                       cfg.teacher_budget, cfg.seed, cfg.max_steps, cfg.dtype,
                                                       on_progress=lambda p: bar.update(1), skip=searched):
            taught[shape], speedups[shape] = teacher, round(speedup, 3)
            with record.open("a") as f:
                f.write(json.dumps({"shape": shape, "speedup": speedups[shape], "schedule": teacher.to_json()}) + "\n")
            best = (f"the search's best: {speedup:.2f}x the expert's speed" if speedup > 0 else
                    "no contender passed its build, check and run when timed again beside the expert")
            print(f"teacher of {shape}: {'the search' if speedup >= MARGIN else 'the expert'}'s kernel ({best})",
                  file=sys.stderr)
    except KeyboardInterrupt:
        print(f"teacher search interrupted after {len(speedups)} of {left} shapes; the others keep their "
              "experts as teachers (--resume RUN_DIR searches them)", file=sys.stderr)
    finally:
        bar.close()
    return speedups


def _recorded_teachers(record: Path, cfg: Config, shapes: list[str]) -> tuple[dict, dict[str, float]]:
    """The teachers (schedules, speedups) recorded in ``record`` (a run's teachers.jsonl: a
    resumed run's own, or ``--teachers``), for the train shapes. A record is data: each line
    is checked to be a schedule of the run's operator and dtype; a last line cut short by an
    interruption is passed over."""
    from kernels.ir.ops import make_op
    from kernels.ir.schedule import Schedule, ScheduleError

    schedules, speedups = {}, {}
    lines = record.read_text().splitlines() if record.is_file() else []
    for n, line in enumerate(lines, 1):
        try:
            d = json.loads(line)
        except json.JSONDecodeError:
            if n == len(lines):
                continue
            raise ValueError(f"{record}:{n} is not JSON") from None
        try:
            shape, speedup = d["shape"], float(d["speedup"])
            schedule = Schedule.from_json(d["schedule"], make_op(cfg.op, shape, cfg.dtype))
        except (KeyError, TypeError, ValueError, ScheduleError) as e:
            raise ValueError(f"{record}:{n} is no teacher of {cfg.op} ({cfg.dtype}): {e}") from None
        if shape in shapes:
            schedules[shape], speedups[shape] = schedule, speedup
    return schedules, speedups


def _check_init(cfg: Config, shape: str, target: Target) -> None:
    """--init's policy fits this run (operator, target, actions, dtype) and the run trains
    it, checked before a run directory is made."""
    from agents import policy
    from envs.actions import ActionTable
    from kernels.ir.ops import make_op

    if not (cfg.timesteps or cfg.teacher_budget):
        raise ValueError("--init trains nothing with --timesteps 0: give PPO steps or a --teacher-budget")
    table = ActionTable(make_op(cfg.op, shape, cfg.dtype), target)
    spec, _ = policy.read(cfg.init, cfg.op, target.kind, len(table))
    if spec.get("dtype", cfg.dtype) != cfg.dtype:
        raise ValueError(f"--init {cfg.init} was trained for {spec['dtype']}, not {cfg.dtype}")


def run(cfg: Config) -> dict:
    if cfg.resume:
        cfg = resumed_config(cfg, keep=("json", "timesteps", "cluster", "gpus"))
    if cfg.op is None:
        raise ValueError("train needs --op (or --resume RUN_DIR)")
    if cfg.timesteps < 0 or (cfg.timesteps == 0 and cfg.imitation_epochs < 1):
        raise ValueError("--timesteps must be at least 1 (or 0, for imitation of the experts alone)")
    if cfg.kl_coef < 0:
        raise ValueError(f"--kl-coef must be at least 0, not {cfg.kl_coef}")
    if cfg.teacher_budget < 0 or (cfg.teacher_budget and cfg.imitation_epochs < 1):
        raise ValueError("--teacher-budget must be at least 0, and needs --imitation-epochs of at least 1")
    if cfg.width < 1:
        raise ValueError(f"--width must be at least 1, not {cfg.width}")
    check_dtype(cfg.dtype, cfg.target)
    target = _target(cfg)
    shapes = family(cfg.op, "small" if cfg.shapes == "small" else "train",
                    "default" if cfg.shapes == "small" else cfg.shapes)
    if cfg.init and not cfg.resume:
        _check_init(cfg, shapes[0], target)

    import torch
    from stable_baselines3.common.logger import configure
    from stable_baselines3.common.vec_env import DummyVecEnv
    from torch.utils.tensorboard import SummaryWriter

    from agents import policy
    from agents.imitation import experts, kl_penalty
    from stable_baselines3.common.callbacks import CallbackList
    from agents.vec_env import Serialized, ThreadVecEnv
    from envs.schedule_env import ScheduleEnv

    torch.set_num_threads(1)  # a small MLP: threads cost more than they give, and kernels need the cores
    # fails fast, before a run dir
    backend = cluster.join(cfg.cluster, target, cfg.gpus) if cfg.cluster or cfg.gpus else None
    n_envs = cfg.n_envs or (backend.parallelism if backend else 2)
    recorded = Path(cfg.resume) / "teachers.jsonl" if cfg.resume else cfg.teachers and Path(cfg.teachers)
    if recorded and not cfg.resume and not recorded.is_file():
        raise ValueError(f"--teachers {cfg.teachers}: no such file")
    found, speedups = _recorded_teachers(recorded, cfg, shapes) if recorded else ({}, {})
    run_dir = Path(cfg.resume) if cfg.resume else new_run_dir(cfg.runs, cfg.op, target.kind, "ppo", cfg.seed)
    model_path = run_dir / "cost_model.pt"
    cost_model = pretrained.load_cost_model(str(model_path) if model_path.is_file() else cfg.cost_model,
                                            target, seed=cfg.seed, dtype=cfg.dtype)
    measurer = Measurer(target, backend and backend.builder, backend and backend.runner,
                        log=run_dir / "tuning.jsonl")
    # The envs live in this process and share the measurer (one cache, one tuning log) and
    # the cost model. Here measurements run one at a time anyway, so they step in turn
    # (DummyVecEnv); on a cluster they step in threads, and their kernels are measured side
    # by side on its devices (agents/vec_env.py says why not envs in remote actors).
    vec_env, env_cost_model = (ThreadVecEnv, Serialized(cost_model)) if backend else (DummyVecEnv, cost_model)
    envs = vec_env([lambda: ScheduleEnv(op=cfg.op, shapes=shapes, target=target,
                                        max_steps=cfg.max_steps, reward=cfg.reward,
                                        cost_model=env_cost_model, measurer=measurer,
                                        update_cost_model=True, dtype=cfg.dtype)
                    for _ in range(n_envs)])
    envs.seed(cfg.seed)
    policy_file = run_dir / "policy.pt"
    saved = policy_file if policy_file.is_file() else policy_file.with_suffix(".zip")  # an old run's: refused
    loaded = bool(cfg.resume) and saved.is_file()
    hyperparameters = dict(n_steps=cfg.n_steps, batch_size=cfg.batch_size, learning_rate=cfg.learning_rate,
                           ent_coef=cfg.ent_coef)
    if loaded:  # loaded before anything is written to the run directory
        agent = policy.load_agent(saved, envs, cfg.op, target.kind, seed=cfg.seed)
    elif cfg.init:
        agent = policy.load_agent(cfg.init, envs, cfg.op, target.kind, seed=cfg.seed,
                                  hyperparameters=hyperparameters)
    else:
        layers = [cfg.width, cfg.width]
        agent = policy.new_agent(envs, hyperparameters, dict(net_arch=dict(pi=layers, vf=layers)), seed=cfg.seed)
    teachers = speedups or None   # shape -> the teacher search's best over the expert, where one ran
    record = run_dir / "teachers.jsonl"
    if cfg.teachers and not cfg.resume:   # the run's record holds every teacher it imitates
        record.write_text("".join(json.dumps({"shape": shape, "speedup": speedups[shape], "schedule": t.to_json()})
                                  + "\n" for shape, t in found.items()))
    writer = SummaryWriter(str(run_dir))
    save_config(run_dir, cfg, writer)
    progress = ProgressLog(run_dir, writer, append=bool(cfg.resume))
    print(f"run directory: {run_dir}", file=sys.stderr)
    agent.set_logger(configure(str(run_dir), ["tensorboard", "csv"]))
    unsearched = bool(cfg.teacher_budget) and len(found) < len(shapes)
    if cfg.imitation_epochs > 0 and (not loaded or unsearched):
        taught = {**experts(cfg.op, shapes, target, cfg.dtype), **found}
        if loaded:   # the saved policy imitated the teachers found so far
            print(f"teacher search resumed: {len(found)} of {len(shapes)} shapes searched before",
                  file=sys.stderr)
        elif cfg.init:
            print(f"starting from {cfg.init}, not imitating the experts", file=sys.stderr)
        else:
            _imitate(cfg, agent, shapes, target, taught, writer)
        if unsearched:
            teachers = {**speedups, **_search_teachers(cfg, shapes, target, measurer, cost_model, agent.policy,
                                                       taught, record, frozenset(found))}
            _imitate(cfg, agent, shapes, target, taught, writer)
    t_learn, steps_before = time.perf_counter(), agent.num_timesteps
    try:
        if cfg.timesteps:
            callbacks = [_callback(progress, measurer, cfg.timesteps)]
            callbacks += [kl_penalty(cfg.kl_coef)] if cfg.kl_coef else []
            agent.learn(total_timesteps=cfg.timesteps, callback=CallbackList(callbacks),
                        reset_num_timesteps=not cfg.resume)
    finally:  # an interrupted run keeps what it learned
        learn_s = time.perf_counter() - t_learn
        policy.save(agent, policy_file, cfg.op, target.kind, hardware=target.device, dtype=cfg.dtype, shapes=shapes,
                    reward=cfg.reward, seed=cfg.seed, command=_command(cfg),
                    **({"teachers": teachers} if teachers else {}))
        cost_model.save(str(model_path))
        envs.close()
        measurer.close()
        writer.close()
    summary = {"op": cfg.op, "target": target.kind, "agent": "ppo", "timesteps": int(agent.num_timesteps),
               "measurements": measurer.measured, "n_envs": n_envs, "run_dir": str(run_dir),
               "policy": str(policy_file), "learn_wall_s": learn_s,
               "steps_per_s": (agent.num_timesteps - steps_before) / learn_s if cfg.timesteps else None,
               "teachers": teachers}
    if backend:
        summary["cluster"] = backend.summary()
    print(f"trained {summary['timesteps']} steps ({measurer.measured} measurements); policy: {policy_file}")
    return summary
