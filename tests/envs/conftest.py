"""Fixtures for the environment tests: one shared, fast measurer and an env factory.

Every episode end compiles and measures a kernel and every reset measures the naive
kernel of its shape, so all environments here share one measurer (one timed call, no
minimum time, a private build cache); its cache makes repeated shapes free.
"""

from __future__ import annotations

import zlib

import pytest

from envs.schedule_env import ScheduleEnv
from kernels.measure import Builder, Candidate, Measurer, MeasureResult, Runner
from kernels.ir.ops import OPERATORS
from kernels.target import cpu_target

OPS = tuple(OPERATORS)


def fast_measurer(cache_dir) -> Measurer:
    return Measurer(cpu_target(), builder=Builder(cache_dir=cache_dir),
                    runner=Runner(repeats=1, min_time_s=0.0, timeout_s=30))


@pytest.fixture(scope="session")
def env_build_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("env-kernel-build")


@pytest.fixture(scope="session")
def env_measurer(env_build_dir):
    """The measurer every env in these tests shares; closed once at the end."""
    m = fast_measurer(env_build_dir)
    yield m
    m.close()


@pytest.fixture
def isolated_measurer(env_build_dir):
    """A measurer with its own worker process, for kernels expected to be wrong (a kernel
    that writes out of bounds could corrupt the shared worker)."""
    m = fast_measurer(env_build_dir)
    yield m
    m.close()


@pytest.fixture(scope="session")
def make_env(env_measurer):
    """``make_env(op, shape=... | shapes=..., **options)``: a ScheduleEnv on the shared measurer.

    Do not ``close()`` these envs: closing one closes the shared measurer's worker.
    """

    def make(op: str = "matmul", **kw) -> ScheduleEnv:
        kw.setdefault("measurer", env_measurer)
        return ScheduleEnv(op=op, **kw)

    return make


class FakeMeasurer:
    """Stands in for :class:`Measurer` without compiling anything.

    Times are a deterministic function of the schedule key (the naive schedule, key
    ``[]``, takes ``naive_ms``); with ``fail=True`` every scheduled kernel fails.
    """

    def __init__(self, naive_ms: float = 10.0, fail: bool = False):
        self.naive_ms, self.fail = naive_ms, fail
        self.measured = 0
        self.calls: list[str] = []
        self.closed = False
        self.paired_with: dict[str, str] = {}   # shape -> schedule key

    def pair_with_schedule(self, op, schedule, name=None) -> float:
        self.paired_with[op.shape_str] = schedule.key()
        return self.time_ms(schedule.key())

    def paired(self, op) -> bool:
        return op.shape_str in self.paired_with

    def time_ms(self, key: str) -> float:
        if key == "[]":
            return self.naive_ms
        return 0.5 + (zlib.crc32(key.encode()) % 1000) / 50.0

    def measure_one(self, schedule, slow_cutoff_s=None) -> MeasureResult:
        Candidate.of(schedule, cpu_target())   # renders, as the real one does: illegal schedules raise
        op, key = schedule.op, schedule.key()
        self.measured += 1
        self.calls.append(key)
        if self.fail and key != "[]":
            return MeasureResult.failure("wrong result: fake failure")
        t = self.time_ms(key)
        return MeasureResult(True, t, (t,), op.flops / (t / 1e3) / 1e9, True, None)

    def close(self) -> None:
        self.closed = True


@pytest.fixture
def fake_measurer_cls():
    """The :class:`FakeMeasurer` class (construct with ``naive_ms=``, ``fail=``)."""
    return FakeMeasurer
