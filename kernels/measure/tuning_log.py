"""An append-only JSON-lines log of measurements.

One line per measurement, so a crashed or killed run loses at most the line it was
writing, and a log can be shared, grepped and replayed into a measurement cache.
"""

from __future__ import annotations

import json
import logging
import math
import os
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any, Iterator

from ..ir.ops import OperatorError, parse_shape
from ..target import Target

logger = logging.getLogger(__name__)

# Identifies one measurement: (op kind, shape, schedule key, target kind, hardware, compiler).
MeasureKey = tuple[str, tuple[int, ...] | str, str, str, str, str]


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
                hardware: str, compiler: str) -> MeasureKey:
    """The measurement-cache key; ``schedule`` is schedule data (not its key text)."""
    return (op, _norm_shape(op, shape), schedule_key(schedule), target, hardware, compiler)


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

    REQUIRED = ("op", "shape", "target", "hardware", "compiler", "schedule", "time_ms", "correct")

    @property
    def key(self) -> MeasureKey:
        return measure_key(self.op, self.shape, self.schedule, self.target, self.hardware,
                           self.compiler)

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
                       timestamp=float(d.get("timestamp") or 0.0))
        except (TypeError, ValueError) as e:
            raise ValueError(f"bad field: {e}") from None


class TuningLog:
    """Append-only JSON-lines file of TuningRecords."""

    def __init__(self, path: str | os.PathLike):
        self.path = Path(path)

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
        """Records in file order; a corrupt or truncated line is skipped with a warning."""
        try:
            f = open(self.path, encoding="utf-8", errors="replace")
        except FileNotFoundError:
            return
        with f:
            for lineno, line in enumerate(f, 1):
                if not line.strip():
                    continue
                try:
                    yield TuningRecord.from_json(line)
                except ValueError as e:
                    logger.warning("%s:%d: skipping corrupt tuning record (%s)", self.path, lineno, e)

    def read(self) -> list[TuningRecord]:
        return list(self)

    def best(self, op: str, shape: str | tuple[int, ...],
             target: Target | str | None = None) -> TuningRecord | None:
        """Fastest correct record for ``op`` at ``shape``. A Target matches kind and
        hardware (times from other machines do not compare); a string matches the kind."""
        want = _norm_shape(op, shape)
        best: TuningRecord | None = None
        for r in self:
            if r.op != op or _norm_shape(r.op, r.shape) != want:
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
