"""The machine a kernel is generated for and measured on."""

from __future__ import annotations

import functools
import os
import platform
import re
import subprocess
from dataclasses import asdict, dataclass

CC = os.environ.get("SCHEDGYM_CC", "gcc")
CFLAGS = ("-O3", "-march=native", "-fopenmp", "-shared", "-fPIC")  # GNU C: fp-contract=fast gives FMAs


@dataclass(frozen=True)
class Target:
    """What code generation and the measurement cache need to know about a device."""

    kind: str            # "cpu" (later "cuda")
    device: str          # CPU model name
    cores: int
    vector_lanes: int    # fp32 lanes of the widest SIMD register
    compiler: str        # compiler version line

    def to_json(self) -> dict:
        return asdict(self)


def _cpu_model() -> str:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def _cpu_flags() -> set[str]:
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("flags"):
                    return set(line.split(":", 1)[1].split())
    except OSError:
        pass
    return set()


def _compiler_version() -> str:
    try:
        out = subprocess.run([CC, "--version"], capture_output=True, text=True, timeout=10)
        return out.stdout.splitlines()[0].strip()
    except (OSError, IndexError, subprocess.TimeoutExpired):
        return "unknown"


@functools.lru_cache(maxsize=None)
def cpu_target() -> Target:
    flags = _cpu_flags()
    lanes = 16 if "avx512f" in flags else 8 if "avx2" in flags else 4
    cores = len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else os.cpu_count()
    return Target("cpu", re.sub(r"\s+", " ", _cpu_model()), cores or 1, lanes, _compiler_version())


def get_target(kind: str) -> Target:
    if kind == "cpu":
        return cpu_target()
    raise ValueError(f"unknown target {kind!r}; known: cpu")
