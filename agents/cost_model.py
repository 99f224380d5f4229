"""A learned cost model: ranks schedules of one shape by predicted run time.

The interface follows TVM's meta-schedule cost model: ``update(records)`` learns
from measurements, ``predict(schedules)`` returns log seconds (only differences
between schedules of one shape are meaningful; the environment uses ratios),
``save``/``load`` keep weights, feature normalisation and config. It prunes before
measuring: :func:`measure_top_k` measures only the k candidates predicted fastest.

**Inputs** are the environment's shape-agnostic features (``envs.features``, with
``step_fraction`` 0), so a model trained on some shapes predicts for others.

**Target.** Times are compared only within a group (op, shape, hardware): the net
predicts ``log t - median(log t of the group)``. :meth:`LearnedCostModel.predict` adds
``log(flops) + c`` back, with ``c`` the training groups' median log seconds per FLOP,
so absolute values are plausible but only within-shape differences are learned.

**Loss**: logistic loss on every pair of one group in a minibatch (minibatches are
built from chunks of single groups, so pairs are plentiful), plus ``reg_weight``
times a Huber loss on the group-relative log time, which keeps predictions on a
common scale across shapes of very different size.

**Architecture.** ``set``: a per-loop MLP over the rows (24 features plus the
loop's depth from the outside and from the inside), masked sum and max pooling,
concatenated with the 15 global features, an MLP head. ``mlp``: an MLP over the
flat 303-vector. Measured on 489 correct random schedules of four shapes (two
matmuls, two conv2d; ``python -m experiments costmodel --logs /tmp/cm_data/*.jsonl
--out M --compare --epochs 60 --seed S`` for seeds 0-4, data from the command's
``--generate``), held-out pairwise accuracy (top-10 recall) was

=========  =========================  ==========================
arch       by schedule (20% of each)  by shape (leave one out)
=========  =========================  ==========================
set        0.750 +- 0.018 (0.72)      0.741
mlp        0.691 +- 0.034 (0.64)      0.698
=========  =========================  ==========================

so ``set`` is the default: +0.06 within a shape, +0.04 on shapes it never saw
(the flat MLP ties weights to loop slots; the set model shares them across
loops). On that noisy shared machine, re-measuring the 183 correct schedules of
one shape agreed with the first measurement on only 0.80 of pairs, so both are
close to what those labels allow.

Normalisation (per feature mean and std; loop rows share one set of statistics)
is taken from the training data, and recomputed whenever that data has doubled
since, so an online model starting from a handful of records settles quickly.
Everything is seeded; CPU only.
"""

from __future__ import annotations

import logging
import math
import os
import statistics
from collections import OrderedDict
from dataclasses import asdict, dataclass, fields
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np
import torch
from torch import nn

from envs.actions import MAX_LOOPS, NestInfo
from envs.features import GLOBAL_WIDTH, LOOP, LOOP_WIDTH, ROWS, SIZE, featurize
from kernels.ir.ops import Operator, OperatorError, make_op
from kernels.ir.schedule import Schedule, ScheduleError
from kernels.target import Target, cpu_target
from kernels.measure.tuning_log import TuningLog, TuningRecord

logger = logging.getLogger(__name__)

FORMAT = "schedgym-cost-model"
VERSION = 1
FEATURE_CACHE = 20_000                 # feature vectors kept (1.2 KB each)
PRESENT = LOOP["present"].start        # the column that says a loop row holds a loop

Group = tuple[str, str, str]           # (op kind, shape, hardware)


class CostModelError(ValueError):
    """A model file that is missing pieces or is not a cost model at all."""


@dataclass
class CostModelConfig:
    arch: str = "set"            # set | mlp (see the module doc)
    hidden: int = 64             # width of the hidden layers
    lr: float = 2e-3             # AdamW learning rate
    weight_decay: float = 1e-4
    batch_size: int = 128        # records per minibatch
    reg_weight: float = 0.2      # weight of the regression term against the ranking term
    min_gap: float = 0.05        # pairs closer than this in log time (5%) are not ranked
    update_epochs: int = 5       # epochs per update() call...
    update_min_steps: int = 20   # ...but at least this many gradient steps
    seed: int = 0


# ---------------------------------------------------------------- networks

class _one_thread:
    """Run torch on one thread: these nets are tiny, and on a busy 2-core machine a
    second thread made a training step ~10x slower, not faster."""

    def __enter__(self):
        self.saved = torch.get_num_threads()
        torch.set_num_threads(1)

    def __exit__(self, *exc):
        torch.set_num_threads(self.saved)


class SetNet(nn.Module):
    """Per-loop MLP, masked sum and max pooling, globals, MLP head."""

    def __init__(self, hidden: int):
        super().__init__()
        self.rows = nn.Sequential(nn.Linear(LOOP_WIDTH + 2, hidden), nn.ReLU(),
                                  nn.Linear(hidden, hidden), nn.ReLU())
        self.head = nn.Sequential(nn.Linear(2 * hidden + GLOBAL_WIDTH, 2 * hidden), nn.ReLU(),
                                  nn.Linear(2 * hidden, hidden), nn.ReLU(), nn.Linear(hidden, 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        b = x.shape[0]
        rows = x[:, :ROWS].reshape(b, MAX_LOOPS, LOOP_WIDTH)
        mask = present.unsqueeze(-1)                                       # b, L, 1
        depth = torch.arange(MAX_LOOPS, dtype=x.dtype, device=x.device).expand(b, -1)
        n = present.sum(1, keepdim=True)
        pos = torch.stack([depth / MAX_LOOPS, (n - 1 - depth) / MAX_LOOPS], -1) * mask
        h = self.rows(torch.cat([rows, pos], -1)) * mask
        pooled_max = h.masked_fill(mask == 0, -1e9).max(1).values
        pooled = torch.cat([h.sum(1) / MAX_LOOPS, pooled_max, x[:, ROWS:]], -1)
        return self.head(pooled).squeeze(-1)


class FlatNet(nn.Module):
    """An MLP over the flat feature vector."""

    def __init__(self, hidden: int):
        super().__init__()
        self.net = nn.Sequential(nn.Linear(SIZE, 4 * hidden), nn.ReLU(), nn.Linear(4 * hidden, 2 * hidden),
                                 nn.ReLU(), nn.Linear(2 * hidden, 1))

    def forward(self, x: torch.Tensor, present: torch.Tensor) -> torch.Tensor:
        return self.net(x).squeeze(-1)


ARCHS = {"set": SetNet, "mlp": FlatNet}


# ---------------------------------------------------------------- records

@dataclass(frozen=True)
class Sample:
    """One usable measurement: a schedule, its group and its time."""

    schedule: Schedule
    group: Group
    log_s: float                 # natural log of seconds


_ops: dict[tuple[str, str], Operator] = {}


def _op(kind: str, shape: str) -> Operator:
    key = (kind, shape)
    if key not in _ops:
        _ops[key] = make_op(kind, shape)
    return _ops[key]


def to_samples(records: Iterable[Any], hardware: str) -> list[Sample]:
    """Usable measurements among ``records``: TuningRecords, or ``(schedule, time_s)`` pairs
    (``time_s`` may also be a MeasureResult). Failed, incorrect and unreadable ones are
    skipped; ``hardware`` names the machine of the pairs."""
    out: list[Sample] = []
    skipped = 0
    for r in records:
        if isinstance(r, TuningRecord):
            if not (r.correct and r.error is None and math.isfinite(r.time_ms) and r.time_ms > 0):
                continue
            try:
                op = _op(r.op, r.shape)
                s = Schedule.from_json({"steps": r.schedule}, op)
            except (OperatorError, ScheduleError, ValueError, TypeError, KeyError, AttributeError):
                skipped += 1
                continue
            out.append(Sample(s, (r.op, op.shape_str, r.hardware), math.log(r.time_ms / 1e3)))
            continue
        s, t = r
        if hasattr(t, "ok"):     # a MeasureResult
            if not t.ok:
                continue
            t = t.time_ms / 1e3
        t = float(t)
        if math.isfinite(t) and t > 0:
            out.append(Sample(s, (s.op.kind, s.op.shape_str, hardware), math.log(t)))
    if skipped:
        logger.warning("skipped %d records whose operator or schedule could not be rebuilt", skipped)
    return out


def records_from_logs(paths: Sequence[str | os.PathLike], target: str = "cpu") -> list[TuningRecord]:
    """Every record of ``target`` in the tuning logs ``paths`` (any operator). Corrupt
    lines are skipped with a warning; a missing file raises FileNotFoundError."""
    out: list[TuningRecord] = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"tuning log {str(p)!r} not found")
        out += [r for r in TuningLog(p) if r.target == target]
    return out


# ---------------------------------------------------------------- metrics

def _group_index(groups: Sequence[Group]) -> list[np.ndarray]:
    by: dict[Group, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    return [np.array(v) for _, v in sorted(by.items())]


def pairwise_accuracy_of(pred: np.ndarray, log_s: np.ndarray, groups: Sequence[Group]) -> float:
    """Fraction of same-group pairs with different times that ``pred`` orders like the
    times (a tie in ``pred`` counts half); NaN when there is no such pair."""
    right = total = 0.0
    for idx in _group_index(groups):
        p, y = pred[idx], log_s[idx]
        dy = np.sign(y[:, None] - y[None, :])
        dp = np.sign(p[:, None] - p[None, :])
        upper = np.triu(dy != 0, 1)
        total += upper.sum()
        right += (upper * (dy == dp)).sum() + 0.5 * (upper * (dp == 0)).sum()
    return float(right / total) if total else math.nan


def top_k_recall_of(pred: np.ndarray, log_s: np.ndarray, groups: Sequence[Group], k: int) -> float:
    """Mean over groups of |predicted k fastest & measured k fastest| / k (k capped at
    the group's size); NaN without groups."""
    recalls = []
    for idx in _group_index(groups):
        kk = min(k, len(idx))
        want = set(idx[np.argsort(log_s[idx], kind="stable")[:kk]])
        got = set(idx[np.argsort(pred[idx], kind="stable")[:kk]])
        recalls.append(len(want & got) / kk)
    return float(np.mean(recalls)) if recalls else math.nan


# ---------------------------------------------------------------- the model

class LearnedCostModel:
    """Predicts log seconds of schedules; learns online from measurements."""

    def __init__(self, config: CostModelConfig | None = None, target: Target | None = None, **overrides):
        cfg = config or CostModelConfig()
        self.config = CostModelConfig(**{**asdict(cfg), **overrides})
        if self.config.arch not in ARCHS:
            raise ValueError(f"unknown arch {self.config.arch!r}; use one of {', '.join(ARCHS)}")
        self.target = target or cpu_target()
        with torch.random.fork_rng(devices=[]):
            torch.manual_seed(self.config.seed)
            self.net = ARCHS[self.config.arch](self.config.hidden)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.config.lr,
                                     weight_decay=self.config.weight_decay)
        self.rng = np.random.default_rng(self.config.seed)
        self.mean = np.zeros(SIZE, np.float32)
        self.std = np.ones(SIZE, np.float32)
        self.norm_records = 0          # training-set size the normalisation was taken from
        self.log_s_per_flop = math.log(1e-9)
        self.steps = 0                 # gradient steps so far
        self.data: dict[tuple[Group, str], tuple[Sample, np.ndarray]] = {}
        self._features: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()

    # ------------------------------------------------------------ features
    def features(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """The (n, SIZE) raw feature matrix; recently seen schedules come from a cache."""
        out = np.empty((len(schedules), SIZE), np.float32)
        cache = self._features
        for i, s in enumerate(schedules):
            key = (s.op.kind, s.op.shape_str, s.key())
            x = cache.get(key)
            if x is None:
                x = featurize(s.op, NestInfo(s.op, s.nest), self.target, 0.0)
                cache[key] = x
                if len(cache) > FEATURE_CACHE:
                    cache.popitem(last=False)
            out[i] = x
        return out

    def clear_cache(self) -> None:
        """Forget cached feature vectors (they depend only on the schedule and target)."""
        self._features.clear()

    def _tensors(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.from_numpy(x[:, PRESENT:ROWS:LOOP_WIDTH] > 0.5).float()
        return torch.from_numpy((x - self.mean) / self.std), present

    def _fit_normalisation(self, x: np.ndarray) -> None:
        rows = x[:, :ROWS].reshape(-1, LOOP_WIDTH)
        rows = rows[rows[:, PRESENT] > 0.5]
        glob = x[:, ROWS:]
        mean = np.concatenate([np.tile(rows.mean(0), MAX_LOOPS), glob.mean(0)])
        std = np.concatenate([np.tile(rows.std(0), MAX_LOOPS), glob.std(0)])
        self.mean = mean.astype(np.float32)
        self.std = np.maximum(std, 0.5).astype(np.float32)   # near-constant features stay near their scale
        self.norm_records = len(x)

    # ------------------------------------------------------------ prediction
    def _raw(self, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        self.net.eval()
        out = []
        with torch.inference_mode(), _one_thread():
            for i in range(0, len(x), chunk):
                out.append(self.net(*self._tensors(x[i:i + chunk])).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def predict(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """Predicted log seconds, one per schedule (float64)."""
        if not len(schedules):
            return np.zeros(0)
        base = np.array([math.log(s.op.flops) for s in schedules]) + self.log_s_per_flop
        return self._raw(self.features(schedules)).astype(np.float64) + base

    def rank(self, schedules: Sequence[Schedule], k: int | None = None) -> list[int]:
        """Indices of the ``k`` (default: all) schedules predicted fastest, fastest first;
        ties keep their order."""
        if not len(schedules) or (k is not None and k <= 0):
            return []
        return [int(i) for i in np.argsort(self.predict(schedules), kind="stable")[:k]]

    # ------------------------------------------------------------ training
    def _add(self, samples: list[Sample]) -> None:
        xs = self.features([s.schedule for s in samples]) if samples else np.zeros((0, SIZE), np.float32)
        for s, x in zip(samples, xs):
            key = (s.group, s.schedule.key())
            old = self.data.get(key)
            if old is not None:   # measured again: keep the mean of the log times
                s = Sample(s.schedule, s.group, (old[0].log_s + s.log_s) / 2)
            self.data[key] = (s, x)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, list[Group]]:
        items = list(self.data.values())
        x = np.stack([x for _, x in items]) if items else np.zeros((0, SIZE), np.float32)
        y = np.array([s.log_s for s, _ in items])
        return x, y, [s.group for s, _ in items]

    def _batches(self, groups: list[np.ndarray]) -> list[np.ndarray]:
        """Shuffled minibatches packed from shuffled single-group chunks."""
        bs = self.config.batch_size
        chunks = []
        for idx in groups:
            p = self.rng.permutation(idx)
            chunks += [p[i:i + bs] for i in range(0, len(p), bs)]
        batches, cur, n = [], [], 0
        for c in (chunks[i] for i in self.rng.permutation(len(chunks))):
            if n + len(c) > bs and cur:
                batches.append(np.concatenate(cur))
                cur, n = [], 0
            cur.append(c)
            n += len(c)
        if cur:
            batches.append(np.concatenate(cur))
        return batches

    def _loss(self, pred: torch.Tensor, y: torch.Tensor, gid: torch.Tensor) -> torch.Tensor:
        dy = y[:, None] - y[None, :]                        # > 0: i slower than j
        pairs = (gid[:, None] == gid[None, :]) & (dy > self.config.min_gap)
        dp = pred[:, None] - pred[None, :]
        rank = nn.functional.softplus(-dp[pairs]).mean() if pairs.any() else pred.sum() * 0
        reg = nn.functional.smooth_l1_loss(pred, y)
        return rank + self.config.reg_weight * reg

    def _train(self, epochs: int, min_steps: int = 0, on_epoch=None) -> float:
        """Train on everything seen; returns the last epoch's mean loss."""
        x, y, groups = self._arrays()
        if len(x) == 0:
            return math.nan
        if len(x) >= 2 * self.norm_records:
            self._fit_normalisation(x)
        gidx = _group_index(groups)
        rel = np.empty(len(y))
        gid = np.empty(len(y), np.int64)
        for g, idx in enumerate(gidx):
            rel[idx] = y[idx] - np.median(y[idx])
            gid[idx] = g
        flops = {g: _op(g[0], g[1]).flops for g in set(groups)}
        self.log_s_per_flop = float(statistics.median(
            float(np.median(y[idx])) - math.log(flops[groups[idx[0]]]) for idx in gidx))
        xt, present = self._tensors(x)
        yt, gt = torch.from_numpy(rel).float(), torch.from_numpy(gid)
        epochs = max(epochs, math.ceil(min_steps / math.ceil(len(x) / self.config.batch_size)))
        loss = math.nan
        with _one_thread():
            for epoch in range(epochs):
                loss = self._epoch(xt, present, yt, gt, gidx)
                if on_epoch is not None:
                    on_epoch(epoch, loss)
        return loss

    def _epoch(self, xt, present, yt, gt, gidx) -> float:
        self.net.train()
        losses = []
        for b in self._batches(gidx):
            bt = torch.from_numpy(b)
            l = self._loss(self.net(xt[bt], present[bt]), yt[bt], gt[bt])
            self.opt.zero_grad()
            l.backward()
            self.opt.step()
            self.steps += 1
            losses.append(l.item())
        return float(np.mean(losses))

    def update(self, records: Iterable[Any]) -> None:
        """Add measurements (TuningRecords or ``(schedule, seconds)`` pairs; failures are
        skipped) and train a few epochs on everything seen so far."""
        samples = to_samples(records, self.target.device)
        if not samples:
            return
        self._add(samples)
        self._train(self.config.update_epochs, self.config.update_min_steps)

    def fit(self, records: Iterable[Any], epochs: int = 60, holdout: float = 0.2, seed: int | None = None,
            by: str = "schedule", k: int = 10, writer=None, log_dir: str | os.PathLike | None = None,
            eval_every: int = 5) -> dict:
        """Train ``epochs`` epochs on ``records`` less a held-out part; return held-out metrics.

        ``by="schedule"`` holds out ``holdout`` of each group's schedules; ``by="shape"``
        holds out that fraction of the groups (at least one, whole). Metrics are NaN
        when nothing is held out. With a SummaryWriter ``writer`` or a ``log_dir``,
        ``cost_model/loss``, ``cost_model/pairwise_accuracy`` and
        ``cost_model/top_k_recall`` (held out) are logged every ``eval_every`` epochs.
        """
        samples = to_samples(records, self.target.device)
        if not samples:
            raise ValueError("no usable records: nothing correct and finite to train on")
        train, held = split(samples, holdout, self.config.seed if seed is None else seed, by)
        self._add(train)
        own_writer = False
        if writer is None and log_dir is not None:
            from torch.utils.tensorboard import SummaryWriter
            writer, own_writer = SummaryWriter(str(log_dir)), True
        if writer is not None:
            table = "\n".join(f"|{f.name}|{getattr(self.config, f.name)}|" for f in fields(self.config))
            writer.add_text("cost_model/hyperparameters", "|param|value|\n|-|-|\n" + table)

        def on_epoch(epoch: int, loss: float) -> None:
            if writer is not None and ((epoch + 1) % eval_every == 0 or epoch + 1 == epochs):
                writer.add_scalar("cost_model/loss", loss, epoch + 1)
                if held:
                    m = self._evaluate(held, k)
                    writer.add_scalar("cost_model/pairwise_accuracy", m["pairwise_accuracy"], epoch + 1)
                    writer.add_scalar("cost_model/top_k_recall", m["top_k_recall"], epoch + 1)

        try:
            loss = self._train(epochs, on_epoch=on_epoch)
        finally:
            if own_writer:
                writer.close()
        m = self._evaluate(held, k)
        return {"records": len(samples), "groups": len({s.group for s in samples}), "train": len(train),
                "held_out": len(held), "by": by, "k": k, "loss": loss, **m}

    # ------------------------------------------------------------ metrics
    def evaluate(self, records: Iterable[Any], k: int = 10) -> dict:
        """Pairwise accuracy and top-k recall on ``records`` (NaN without usable ones)."""
        return self._evaluate(to_samples(records, self.target.device), k)

    def _evaluate(self, samples: list[Sample], k: int) -> dict:
        if not samples:
            return {"pairwise_accuracy": math.nan, "top_k_recall": math.nan}
        pred = self._raw(self.features([s.schedule for s in samples]))
        y = np.array([s.log_s for s in samples])
        groups = [s.group for s in samples]
        return {"pairwise_accuracy": pairwise_accuracy_of(pred, y, groups),
                "top_k_recall": top_k_recall_of(pred, y, groups, k)}

    def pairwise_accuracy(self, records: Iterable[Any]) -> float:
        """Fraction of same-shape pairs of ``records`` predicted in the measured order."""
        return self.evaluate(records)["pairwise_accuracy"]

    def top_k_recall(self, records: Iterable[Any], k: int = 10) -> float:
        """Per shape, the share of the k fastest ``records`` among the k predicted fastest."""
        return self.evaluate(records, k)["top_k_recall"]

    # ------------------------------------------------------------ persistence
    def save(self, path: str | os.PathLike) -> None:
        """Weights, normalisation and config (not the training data), written atomically."""
        path = Path(path)
        path.parent.mkdir(parents=True, exist_ok=True)
        state = {"format": FORMAT, "version": VERSION, "config": asdict(self.config),
                 "weights": self.net.state_dict(), "mean": torch.from_numpy(self.mean),
                 "std": torch.from_numpy(self.std), "norm_records": self.norm_records,
                 "log_s_per_flop": self.log_s_per_flop, "steps": self.steps, "feature_size": SIZE}
        tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
        torch.save(state, tmp)
        os.replace(tmp, path)

    @classmethod
    def load(cls, path: str | os.PathLike, target: Target | None = None) -> "LearnedCostModel":
        """A model written by :meth:`save`; FileNotFoundError or CostModelError otherwise."""
        path = Path(path)
        if not path.is_file():
            raise FileNotFoundError(f"no cost model at {str(path)!r}")
        try:
            state = torch.load(path, map_location="cpu", weights_only=True)
        except Exception as e:
            raise CostModelError(f"{path} is not a readable cost model ({type(e).__name__}: {e})") from None
        if not isinstance(state, dict) or state.get("format") != FORMAT:
            raise CostModelError(f"{path} is not a cost model file")
        if state.get("version") != VERSION or state.get("feature_size") != SIZE:
            raise CostModelError(f"{path}: version {state.get('version')} with {state.get('feature_size')} "
                                 f"features; this code reads version {VERSION} with {SIZE}")
        try:
            known = {f.name for f in fields(CostModelConfig)}
            model = cls(CostModelConfig(**{k: v for k, v in state["config"].items() if k in known}), target)
            model.net.load_state_dict(state["weights"])
            model.mean = state["mean"].numpy().astype(np.float32)
            model.std = state["std"].numpy().astype(np.float32)
            model.norm_records = int(state["norm_records"])
            model.log_s_per_flop = float(state["log_s_per_flop"])
            model.steps = int(state["steps"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CostModelError(f"{path}: incomplete cost model ({type(e).__name__}: {e})") from None
        return model


def load(path: str | os.PathLike, target: Target | None = None) -> LearnedCostModel:
    return LearnedCostModel.load(path, target)


# ---------------------------------------------------------------- splits

def split(samples: list[Sample], holdout: float, seed: int, by: str = "schedule") -> tuple[list[Sample], list[Sample]]:
    """(train, held out): ``holdout`` of each group's samples (``by="schedule"``) or of the
    groups (``by="shape"``, at least one group each side when there are two)."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must lie in [0, 1), not {holdout}")
    rng = np.random.default_rng(seed)
    groups = _group_index([s.group for s in samples])
    if by == "schedule":
        held_idx = set()
        for idx in groups:
            n = int(round(holdout * len(idx)))
            held_idx |= set(rng.permutation(idx)[:n].tolist())
    elif by == "shape":
        n = min(max(1, int(round(holdout * len(groups)))), len(groups) - 1) if holdout > 0 else 0
        held_idx = {int(i) for g in rng.permutation(len(groups))[:n] for i in groups[g]}
    else:
        raise ValueError(f"unknown split {by!r}; use schedule or shape")
    return ([s for i, s in enumerate(samples) if i not in held_idx],
            [s for i, s in enumerate(samples) if i in held_idx])


def cross_validate_by_shape(records: Iterable[Any], config: CostModelConfig | None = None, epochs: int = 60,
                            folds: int = 5, k: int = 10, target: Target | None = None) -> dict:
    """Train on some shapes, test on the others: the groups split into ``folds`` folds
    (leave-one-shape-out with at most ``folds`` shapes), a fresh model per fold. Pairwise
    accuracy is pooled over all held-out pairs, top-k recall averaged over groups."""
    target = target or cpu_target()
    samples = to_samples(records, target.device)
    groups = sorted({s.group for s in samples})
    if len(groups) < 2:
        raise ValueError("a by-shape split needs records of at least two shapes")
    config = config or CostModelConfig()
    order = np.random.default_rng(config.seed).permutation(len(groups))
    nf = min(folds, len(groups))
    preds, ys, gs = [], [], []
    for f in range(nf):
        held_groups = {groups[i] for i in order[f::nf]}
        model = LearnedCostModel(config, target)
        model._add([s for s in samples if s.group not in held_groups])
        model._train(epochs)
        held = [s for s in samples if s.group in held_groups]
        preds.append(model._raw(model.features([s.schedule for s in held])))
        ys.append(np.array([s.log_s for s in held]))
        gs += [s.group for s in held]
    pred, y = np.concatenate(preds), np.concatenate(ys)
    return {"folds": nf, "groups": len(groups), "pairwise_accuracy": pairwise_accuracy_of(pred, y, gs),
            "top_k_recall": top_k_recall_of(pred, y, gs, k)}


# ---------------------------------------------------------------- pruning before measuring

def select_top_k(model, schedules: Sequence[Schedule], k: int) -> list[int]:
    """Indices of the ``k`` schedules predicted fastest, fastest first (ties keep order)."""
    if k <= 0 or not len(schedules):
        return []
    pred = np.asarray(model.predict(schedules), dtype=np.float64)
    return [int(i) for i in np.argsort(pred, kind="stable")[:k]]


def measure_top_k(model, measurer, schedules: Sequence[Schedule], k: int) -> list[tuple[Schedule, Any]]:
    """Measure only the ``k`` schedules predicted fastest, feed the results back to the
    model (``update``) and return ``(schedule, MeasureResult)`` pairs, fastest predicted first."""
    chosen = [schedules[i] for i in select_top_k(model, schedules, k)]
    by_op: dict[Operator, list[int]] = {}
    for i, s in enumerate(chosen):
        by_op.setdefault(s.op, []).append(i)
    results: list[Any] = [None] * len(chosen)
    for op, idx in by_op.items():
        res = measurer.measure([chosen[i] for i in idx])
        for i, r in zip(idx, res):
            results[i] = r
    pairs = list(zip(chosen, results))
    model.update(pairs)
    return pairs
