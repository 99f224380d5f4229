"""What the cost model learns from: samples (a schedule, its group, its time) from
tuning records or measured pairs, tuning logs, and held-out splits."""

from __future__ import annotations

import logging
import math
import os
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Iterable, Sequence

import numpy as np

from kernels.ir.ops import Operator, OperatorError, make_op
from kernels.ir.schedule import Schedule, ScheduleError
from kernels.measure.tuning_log import TuningLog, TuningRecord

logger = logging.getLogger(__name__)

Group = tuple[str, str, str]           # (op kind, shape, hardware): times compare only within one


@dataclass(frozen=True)
class Sample:
    """One usable measurement: a schedule, its group and its time."""

    schedule: Schedule
    group: Group
    log_s: float                 # natural log of seconds


_ops: dict[tuple[str, str, str], Operator] = {}


def operator(kind: str, shape: str, dtype: str = "fp32") -> Operator:
    """``make_op(kind, shape, dtype)``, built once."""
    key = (kind, shape, dtype)
    if key not in _ops:
        _ops[key] = make_op(kind, shape, dtype)
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
                op = operator(r.op, r.shape, r.dtype)
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


def records_from_logs(paths: Sequence[str | os.PathLike], target: str = "cpu",
                      dtype: str = "fp32") -> list[TuningRecord]:
    """Every record of ``target`` and ``dtype`` in the tuning logs ``paths`` (any operator).
    Corrupt lines are skipped with a warning; a missing file raises FileNotFoundError."""
    out: list[TuningRecord] = []
    for p in paths:
        if not Path(p).is_file():
            raise FileNotFoundError(f"tuning log {str(p)!r} not found")
        out += [r for r in TuningLog(p) if r.target == target and r.dtype == dtype]
    return out


def group_index(groups: Sequence[Group]) -> list[np.ndarray]:
    """The positions of each group's members, groups in sorted order."""
    by: dict[Group, list[int]] = {}
    for i, g in enumerate(groups):
        by.setdefault(g, []).append(i)
    return [np.array(v) for _, v in sorted(by.items())]


def split(samples: list[Sample], holdout: float, seed: int, by: str = "schedule") -> tuple[list[Sample], list[Sample]]:
    """(train, held out): ``holdout`` of each group's samples (``by="schedule"``) or of the
    groups (``by="shape"``, at least one group each side when there are two)."""
    if not 0 <= holdout < 1:
        raise ValueError(f"holdout must lie in [0, 1), not {holdout}")
    rng = np.random.default_rng(seed)
    groups = group_index([s.group for s in samples])
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
