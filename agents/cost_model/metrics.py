"""How well predictions rank schedules within each group: pairwise accuracy, top-k recall."""

from __future__ import annotations

import math
from typing import Sequence

import numpy as np

from .data import Group, group_index


def pairwise_accuracy_of(pred: np.ndarray, log_s: np.ndarray, groups: Sequence[Group]) -> float:
    """Fraction of same-group pairs with different times that ``pred`` orders like the
    times (a tie in ``pred`` counts half); NaN when there is no such pair."""
    right = total = 0.0
    for idx in group_index(groups):
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
    for idx in group_index(groups):
        kk = min(k, len(idx))
        want = set(idx[np.argsort(log_s[idx], kind="stable")[:kk]])
        got = set(idx[np.argsort(pred[idx], kind="stable")[:kk]])
        recalls.append(len(want & got) / kk)
    return float(np.mean(recalls)) if recalls else math.nan


def ranking_metrics(pred: np.ndarray, log_s: np.ndarray, groups: Sequence[Group], k: int) -> dict:
    """Both, as the dict the model's evaluations return (NaN without pairs or groups)."""
    return {"pairwise_accuracy": pairwise_accuracy_of(pred, log_s, groups),
            "top_k_recall": top_k_recall_of(pred, log_s, groups, k)}
