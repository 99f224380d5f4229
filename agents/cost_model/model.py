"""LearnedCostModel: TVM's cost-model interface (``update``/``predict``/``save``/``load``)
over the environment's features, with ``rank`` for the agents and ``fit`` for training
from logs."""

from __future__ import annotations

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
from envs.features import ROWS, SIZE, featurize
from kernels.ir.schedule import Schedule
from kernels.target import Target, cpu_target

from .data import Group, Sample, group_index, operator, split, to_samples
from .features import NEST_LOOP_WIDTH, NEST_SIZE, nest_features
from .metrics import ranking_metrics
from .nets import ARCHS, Ensemble, loop_rows, one_thread, present_rows

FORMAT = "schedgym-cost-model"
VERSION = 1
FEATURE_CACHE = 20_000                 # feature vectors kept (1.2 KB each)


class CostModelError(ValueError):
    """A model file that is missing pieces or is not a cost model at all."""


@dataclass
class CostModelConfig:
    arch: str = "set"            # set | mlp (see the package doc)
    hidden: int = 64             # width of the hidden layers
    lr: float = 2e-3             # AdamW learning rate
    weight_decay: float = 1e-4
    batch_size: int = 128        # records per minibatch
    reg_weight: float = 0.2      # weight of the regression term against the ranking term
    min_gap: float = 0.05        # pairs closer than this in log time (5%) are not ranked
    update_epochs: int = 5       # epochs per update() call...
    update_min_steps: int = 20   # ...but at least this many gradient steps
    nest_features: bool = True   # add the cost model's own columns (features.py) to the env's
    ensemble: int = 3            # nets averaged (nets.Ensemble)
    seed: int = 0


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
            self.net = Ensemble(self.config.arch, self.config.hidden, self.config.nest_features,
                                self.config.ensemble)
        self.opt = torch.optim.AdamW(self.net.parameters(), lr=self.config.lr,
                                     weight_decay=self.config.weight_decay)
        self.rng = np.random.default_rng(self.config.seed)
        self.width = SIZE + (NEST_SIZE if self.config.nest_features else 0)   # columns of a feature vector
        self.mean = np.zeros(self.width, np.float32)
        self.std = np.ones(self.width, np.float32)
        self.norm_records = 0          # training-set size the normalisation was taken from
        self.log_s_per_flop = math.log(1e-9)
        self.steps = 0                 # gradient steps so far
        self.data: dict[tuple[Group, str], tuple[Sample, np.ndarray]] = {}
        self._features: OrderedDict[tuple[str, str, str], np.ndarray] = OrderedDict()

    # ------------------------------------------------------------ features
    def features(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """The (n, width) raw feature matrix; recently seen schedules come from a cache."""
        out = np.empty((len(schedules), self.width), np.float32)
        cache = self._features
        for i, s in enumerate(schedules):
            key = (s.op.kind, s.op.shape_str, s.key())
            x = cache.get(key)
            if x is None:
                info = NestInfo(s.op, s.nest)
                x = featurize(s.op, info, self.target, 0.0)
                if self.config.nest_features:
                    x = np.concatenate([x, nest_features(info, self.target)])
                cache[key] = x
                if len(cache) > FEATURE_CACHE:
                    cache.popitem(last=False)
            out[i] = x
        return out

    def clear_cache(self) -> None:
        """Forget cached feature vectors (they depend only on the schedule and target)."""
        self._features.clear()

    def _tensors(self, x: np.ndarray) -> tuple[torch.Tensor, torch.Tensor]:
        present = torch.from_numpy(present_rows(x)).float()
        return torch.from_numpy((x - self.mean) / self.std), present

    def _fit_normalisation(self, x: np.ndarray) -> None:
        rows = loop_rows(x)[present_rows(x)]
        glob = x[:, ROWS:SIZE]
        mean = [np.tile(rows.mean(0), MAX_LOOPS), glob.mean(0)]
        std = [np.tile(rows.std(0), MAX_LOOPS), glob.std(0)]
        if self.config.nest_features:   # the same for the cost model's own rows and globals
            extra = SIZE + MAX_LOOPS * NEST_LOOP_WIDTH
            nest_rows = x[:, SIZE:extra].reshape(len(x), MAX_LOOPS, NEST_LOOP_WIDTH)[present_rows(x)]
            mean += [np.tile(nest_rows.mean(0), MAX_LOOPS), x[:, extra:].mean(0)]
            std += [np.tile(nest_rows.std(0), MAX_LOOPS), x[:, extra:].std(0)]
        mean, std = np.concatenate(mean), np.concatenate(std)
        self.mean = mean.astype(np.float32)
        self.std = np.maximum(std, 0.5).astype(np.float32)   # near-constant features stay near their scale
        self.norm_records = len(x)

    # ------------------------------------------------------------ prediction
    def _raw(self, x: np.ndarray, chunk: int = 4096) -> np.ndarray:
        self.net.eval()
        out = []
        with torch.inference_mode(), one_thread():
            for i in range(0, len(x), chunk):
                out.append(self.net(*self._tensors(x[i:i + chunk])).mean(0).numpy())
        return np.concatenate(out) if out else np.zeros(0, np.float32)

    def score(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """What the net predicts: log seconds relative to the schedule's group (float32)."""
        return self._raw(self.features(schedules))

    def predict(self, schedules: Sequence[Schedule]) -> np.ndarray:
        """Predicted log seconds, one per schedule (float64)."""
        if not len(schedules):
            return np.zeros(0)
        base = np.array([math.log(s.op.flops) for s in schedules]) + self.log_s_per_flop
        return self.score(schedules).astype(np.float64) + base

    def rank(self, schedules: Sequence[Schedule], k: int | None = None) -> list[int]:
        """Indices of the ``k`` (default: all) schedules predicted fastest, fastest first;
        ties keep their order."""
        if not len(schedules) or (k is not None and k <= 0):
            return []
        return [int(i) for i in np.argsort(self.predict(schedules), kind="stable")[:k]]

    # ------------------------------------------------------------ training
    def _add(self, samples: list[Sample]) -> None:
        xs = self.features([s.schedule for s in samples]) if samples else np.zeros((0, self.width), np.float32)
        for s, x in zip(samples, xs):
            key = (s.group, s.schedule.key())
            old = self.data.get(key)
            if old is not None:   # measured again: keep the mean of the log times
                s = Sample(s.schedule, s.group, (old[0].log_s + s.log_s) / 2)
            self.data[key] = (s, x)

    def _arrays(self) -> tuple[np.ndarray, np.ndarray, list[Group]]:
        items = list(self.data.values())
        x = np.stack([x for _, x in items]) if items else np.zeros((0, self.width), np.float32)
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

    def learn(self, samples: list[Sample], epochs: int, min_steps: int = 0, on_epoch=None) -> float:
        """Add ``samples`` to what was seen and train ``epochs`` epochs (at least
        ``min_steps`` gradient steps) on all of it; the last epoch's mean loss."""
        self._add(samples)
        x, y, groups = self._arrays()
        if len(x) == 0:
            return math.nan
        if len(x) >= 2 * self.norm_records:
            self._fit_normalisation(x)
        gidx = group_index(groups)
        rel = np.empty(len(y))
        gid = np.empty(len(y), np.int64)
        for g, idx in enumerate(gidx):
            rel[idx] = y[idx] - np.median(y[idx])
            gid[idx] = g
        flops = {g: operator(g[0], g[1]).flops for g in set(groups)}
        self.log_s_per_flop = float(statistics.median(
            float(np.median(y[idx])) - math.log(flops[groups[idx[0]]]) for idx in gidx))
        xt, present = self._tensors(x)
        yt, gt = torch.from_numpy(rel).float(), torch.from_numpy(gid)
        epochs = max(epochs, math.ceil(min_steps / math.ceil(len(x) / self.config.batch_size)))
        loss = math.nan
        with one_thread():
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
            preds = self.net(xt[bt], present[bt])
            l = sum(self._loss(p, yt[bt], gt[bt]) for p in preds) / len(preds)
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
        self.learn(samples, self.config.update_epochs, self.config.update_min_steps)

    def fit(self, records: Iterable[Any], epochs: int = 30, holdout: float = 0.2, seed: int | None = None,
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
            loss = self.learn(train, epochs, on_epoch=on_epoch)
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
        return ranking_metrics(self.score([s.schedule for s in samples]), np.array([s.log_s for s in samples]),
                               [s.group for s in samples], k)

    def pairwise_accuracy(self, records: Iterable[Any]) -> float:
        """Fraction of same-shape pairs of ``records`` predicted in the measured order."""
        return self.evaluate(records)["pairwise_accuracy"]

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
            config = {"nest_features": False, "ensemble": 1, **state["config"]}   # older files: one net...
            model = cls(CostModelConfig(**{k: v for k, v in config.items() if k in known}), target)
            weights = state["weights"]
            if not any(k.startswith("members.") for k in weights):                 # ...saved bare
                weights = {f"members.0.{k}": v for k, v in weights.items()}
            model.net.load_state_dict(weights)
            model.mean = state["mean"].numpy().astype(np.float32)
            model.std = state["std"].numpy().astype(np.float32)
            model.norm_records = int(state["norm_records"])
            model.log_s_per_flop = float(state["log_s_per_flop"])
            model.steps = int(state["steps"])
        except (KeyError, TypeError, ValueError, RuntimeError) as e:
            raise CostModelError(f"{path}: incomplete cost model ({type(e).__name__}: {e})") from None
        return model
