"""The tuning database: one JSON-lines tuning log holding every measurement of every task.

Records carry the operator, shape, schedule, target, hardware and compiler
(:class:`kernels.measure.tuning_log.TuningRecord`); what a run takes from the database
must match all of them on this machine, so a task tuned once is reused by any later run
here and never on another machine or compiler. Like every tuning log it is data: a
record that cannot be a measurement is skipped, and every kernel built from it is
checked again (the tuned model against torch) before it is used.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Iterator

from kernels.ir.ops import Operator
from kernels.ir.schedule import Schedule, ScheduleError
from kernels.measure import MeasureResult
from kernels.measure.build import private_dir
from kernels.target import Target


def default_path() -> Path:
    """``$SCHEDGYM_CACHE/tuning.jsonl``, else ``~/.cache/schedgym/tuning.jsonl``."""
    root = os.environ.get("SCHEDGYM_CACHE")
    return private_dir(Path(root) if root else Path.home() / ".cache" / "schedgym") / "tuning.jsonl"


def check_path(path: str | os.PathLike) -> Path:
    """``path`` as a database file, or a one-line error before anything is tuned."""
    p = Path(path)
    if p.is_dir():
        raise ValueError(f"--database {p} is a directory; give a file, e.g. {p / 'tuning.jsonl'}")
    if p.exists() and not os.access(p, os.R_OK | os.W_OK):
        raise ValueError(f"--database {p} cannot be read and written")
    return p


def records(cache: dict, op: Operator, target: Target) -> Iterator[tuple[str, Schedule, MeasureResult]]:
    """``(schedule key, schedule, result)`` of every measurement of ``op`` on this machine
    (target, hardware and compiler) in a measurer's ``cache``."""
    for (kind, shape, key, target_kind, device, compiler, dtype), res in list(cache.items()):
        if kind != op.kind or shape != op.shape or dtype != op.dtype or \
                (target_kind, device, compiler) != (target.kind, target.device, target.compiler):
            continue
        try:
            yield key, Schedule.from_json({"steps": json.loads(key)}, op), res
        except (ValueError, TypeError, ScheduleError):
            continue


def best(cache: dict, op: Operator, target: Target) -> tuple[Schedule, MeasureResult] | None:
    """The fastest correct measurement of ``op`` on this machine, if any."""
    found = [(s, r) for _, s, r in records(cache, op, target) if r.ok]
    return min(found, key=lambda x: x[1].time_ms) if found else None
