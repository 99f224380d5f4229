"""An append-only JSON-lines log of measurements.

One line per measurement, so a crashed or killed run loses at most the line it was
writing, and a log can be shared, grepped and replayed into a measurement cache.

A log is data, not truth: a file can be edited, merged from elsewhere or written by a
broken clock, and whatever is read back may become a search's best or a cached
result. So reading skips, with a warning naming the line, every record that cannot
be a measurement (:func:`record_problem`).
"""

from __future__ import annotations

import functools
import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..ir.ops import OperatorError, make_op, parse_shape
from ..target import MAX_GFLOPS, Target

logger = logging.getLogger(__name__)

# Identifies one measurement: (op kind, shape, schedule key, target kind, hardware, compiler, dtype).
MeasureKey = tuple[str, tuple[int, ...] | str, str, str, str, str, str]


def schedule_key(schedule: Any) -> str:
    """Canonical text of a schedule (JSON data), so equal schedules get equal keys
    whatever the key order or spacing they were written with."""
    return json.dumps(schedule, sort_keys=True, separators=(",", ":"))


def _norm_shape(kind: str, shape: str | tuple[int, ...]) -> tuple[int, ...] | str:
    """``"8x8x8"``, ``"8,8,8"`` and ``(8, 8, 8)`` are the same shape."""
    try:
        return parse_shape(kind, shape)
    except (OperatorError, TypeError, ValueError):
        return shape if isinstance(shape, str) else tuple(shape)


def measure_key(op: str, shape: str | tuple[int, ...], schedule: Any, target: str,
                hardware: str, compiler: str, dtype: str = "fp32") -> MeasureKey:
    """The measurement-cache key; ``schedule`` is schedule data (not its key text)."""
    return (op, _norm_shape(op, shape), schedule_key(schedule), target, hardware, compiler, dtype)


def _finite(x: float) -> float | None:
    return x if math.isfinite(x) else None


@dataclass
class TuningRecord:
    """One measurement of one schedule of one operator on one machine."""

    op: str                       # operator kind
    shape: str                    # shape string
    target: str                   # target kind ("cpu")
    hardware: str                 # target.device
    compiler: str                 # compiler version line
    schedule: Any                 # schedule steps as JSON data
    time_ms: float                # median; inf when failed
    times_ms: tuple[float, ...] = ()
    gflops: float = 0.0
    correct: bool = False
    error: str | None = None
    timestamp: float = field(default_factory=time.time)
    dtype: str = "fp32"           # the operator's (logs from before dtypes hold fp32 records)

    REQUIRED = ("op", "shape", "target", "hardware", "compiler", "schedule", "time_ms", "correct")

    @property
    def key(self) -> MeasureKey:
        return measure_key(self.op, self.shape, self.schedule, self.target, self.hardware,
                           self.compiler, self.dtype)

    def to_json(self) -> str:
        """One line of JSON; an infinite time is written as null (JSON has no inf)."""
        d = asdict(self)
        d["time_ms"] = _finite(self.time_ms)
        d["times_ms"] = [_finite(t) for t in self.times_ms]
        d["gflops"] = _finite(self.gflops) or 0.0
        return json.dumps(d, separators=(",", ":"), allow_nan=False)

    @classmethod
    def from_json(cls, line: str) -> "TuningRecord":
        """Parse one line; raises ValueError when it is not a complete record."""
        d = json.loads(line)
        if not isinstance(d, dict):
            raise ValueError("not a JSON object")
        missing = [k for k in cls.REQUIRED if k not in d]
        if missing:
            raise ValueError(f"missing keys {', '.join(missing)}")
        try:
            t = d["time_ms"]
            return cls(op=str(d["op"]), shape=str(d["shape"]), target=str(d["target"]),
                       hardware=str(d["hardware"]), compiler=str(d["compiler"]),
                       schedule=d["schedule"],
                       time_ms=math.inf if t is None else float(t),
                       times_ms=tuple(math.inf if x is None else float(x)
                                      for x in d.get("times_ms") or ()),
                       gflops=float(d.get("gflops") or 0.0), correct=bool(d["correct"]),
                       error=None if d.get("error") is None else str(d["error"]),
                       timestamp=float(d.get("timestamp") or 0.0), dtype=str(d.get("dtype", "fp32")))
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad field: {e}") from None


@functools.lru_cache(maxsize=1024)
def _flops(op: str, shape: str) -> int | None:
    try:
        return make_op(op, shape).flops
    except (OperatorError, TypeError, ValueError):
        return None


def record_problem(r: TuningRecord, peak: float = MAX_GFLOPS) -> str | None:
    """Why ``r`` cannot be a real measurement, None when it can: a NaN or negative
    number; for a successful record (correct, no error), a time that is not positive and
    finite, a median outside its samples, or GFLOPS (recorded, or implied by the time
    and the operator's flops) above ``peak``."""
    numbers = [("time_ms", r.time_ms), ("gflops", r.gflops)] + [("times_ms", t) for t in r.times_ms]
    for name, x in numbers:
        if math.isnan(x) or x < 0:
            return f"{name} is {x}"
    if not math.isfinite(r.gflops):
        return f"gflops is {r.gflops}"
    if not r.correct or r.error is not None:
        return None
    if not 0 < r.time_ms < math.inf:
        return f"time_ms {r.time_ms} for a correct record"
    if r.times_ms:
        if not all(0 < t < math.inf for t in r.times_ms):
            return f"times_ms {list(r.times_ms)} for a correct record"
        if not min(r.times_ms) * (1 - 1e-9) <= r.time_ms <= max(r.times_ms) * (1 + 1e-9):
            return f"time_ms {r.time_ms} outside times_ms {list(r.times_ms)}"
    flops = _flops(r.op, r.shape)
    implied = flops / (r.time_ms * 1e6) if flops is not None else 0.0
    if max(r.gflops, implied) > peak:
        return f"{max(r.gflops, implied):.3g} GFLOPS, above the {peak:.3g} this hardware can reach"
    return None


class TuningLog:
    """Append-only JSON-lines file of TuningRecords.

    With a ``target``, records from its hardware are held to its peak GFLOPS when read
    (others to a bound no device reaches); ``best`` and :meth:`records` may name another.
    """

    def __init__(self, path: str | os.PathLike, target: Target | None = None):
        self.path = Path(path)
        self.target = target

    def append(self, record: TuningRecord) -> None:
        """Write one line and fsync it, so a kill loses at most the line being written."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        data = (record.to_json() + "\n").encode()
        fd = os.open(self.path, os.O_RDWR | os.O_APPEND | os.O_CREAT, 0o644)
        try:
            # A previous writer killed mid-line left no newline: start a fresh line so
            # this record is not glued onto the broken one.
            size = os.fstat(fd).st_size
            if size and os.pread(fd, 1, size - 1) != b"\n":
                data = b"\n" + data
            os.write(fd, data)
            os.fsync(fd)
        finally:
            os.close(fd)

    def __iter__(self) -> Iterator[TuningRecord]:
        return self.records(self.target)

    def records(self, target: Target | None = None) -> Iterator[TuningRecord]:
        """Records in file order; a corrupt or truncated line, or a record that cannot be a
        measurement (on ``target``'s hardware, judged by its peak), is skipped with a warning."""
        try:
            f = open(self.path, encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        peak = target.peak_gflops if target is not None else MAX_GFLOPS
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    r = TuningRecord.from_json(line)
                except ValueError as e:
                    logger.warning("%s:%d: skipping corrupt tuning record (%s)", self.path, lineno, e)
                    continue
                mine = target is not None and (r.target, r.hardware) == (target.kind, target.device)
                problem = record_problem(r, peak if mine else MAX_GFLOPS)
                if problem:
                    logger.warning("%s:%d: skipping impossible tuning record (%s)", self.path, lineno, problem)
                    continue
                yield r

    def read(self) -> list[TuningRecord]:
        return list(self)

    def best(self, op: str, shape: str | tuple[int, ...],
             target: Target | str | None = None, dtype: str = "fp32") -> TuningRecord | None:
        """Fastest correct record for ``op`` at ``shape`` in ``dtype``. A Target matches kind and
        hardware (times from other machines do not compare); a string matches the kind."""
        want = _norm_shape(op, shape)
        best: TuningRecord | None = None
        for r in self.records(target if isinstance(target, Target) else self.target):
            if r.op != op or r.dtype != dtype or _norm_shape(r.op, r.shape) != want:
                continue
            if not r.correct or r.error is not None or not math.isfinite(r.time_ms):
                continue
            if isinstance(target, Target) and (r.target, r.hardware) != (target.kind, target.device):
                continue
            if isinstance(target, str) and r.target != target:
                continue
            if best is None or r.time_ms < best.time_ms:
                best = r
        return best
