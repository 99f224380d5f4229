"""Cross-validation by shape: how well the model ranks schedules of shapes it never saw."""

from __future__ import annotations

from typing import Any, Iterable

import numpy as np

from kernels.target import Target, cpu_target

from .data import to_samples
from .metrics import ranking_metrics
from .model import CostModelConfig, LearnedCostModel


def cross_validate_by_shape(records: Iterable[Any], config: CostModelConfig | None = None, epochs: int = 30,
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
        model.learn([s for s in samples if s.group not in held_groups], epochs)
        held = [s for s in samples if s.group in held_groups]
        preds.append(model.score([s.schedule for s in held]))
        ys.append(np.array([s.log_s for s in held]))
        gs += [s.group for s in held]
    return {"folds": nf, "groups": len(groups), **ranking_metrics(np.concatenate(preds), np.concatenate(ys), gs, k)}
