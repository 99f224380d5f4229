"""Shared fixtures: build and run schedules against the numpy reference, quickly."""

from __future__ import annotations

import base64
import json
import pickle
import zipfile
from pathlib import Path

import numpy as np
import pytest

from kernels.ir import lower as ir
from kernels.ir.expr import Lin
from kernels.ir.lower import lower
from kernels.ir.printer import print_loop_nest
from kernels.measure import Builder, Candidate, Measurer, MeasureResult, Runner
from kernels.codegen import render
from kernels.ir.schedule import Schedule
from kernels.target import cpu_target


@pytest.fixture(scope="session")
def target():
    return cpu_target()


@pytest.fixture(scope="session")
def check_measurer(tmp_path_factory, target):
    """A measurer for correctness only: one timed call, no warm-up, private build cache."""
    builder = Builder(cache_dir=tmp_path_factory.mktemp("kernel-build"))
    runner = Runner(timeout_s=30, repeats=1, warmup=0, min_time_s=0.0)
    with Measurer(target, builder=builder, runner=runner) as m:
        yield m


@pytest.fixture(scope="session")
def small_agent(tmp_path_factory):
    """An untrained MaskablePPO for matmul on this CPU: the spaces of a real policy."""
    from agents.policy import new_agent
    from envs.schedule_env import ScheduleEnv

    measurer = Measurer(cpu_target(), builder=Builder(cache_dir=tmp_path_factory.mktemp("agent-build")))
    return new_agent(ScheduleEnv(op="matmul", shape="16x24x8", measurer=measurer),
                     dict(n_steps=8, batch_size=8), seed=0)


class _Payload:
    """Unpickled, it creates a file: what a hostile policy file could do (any command)."""

    def __init__(self, marker: Path):
        self.marker = str(marker)

    def __reduce__(self):
        return open, (self.marker, "w")


class HostileFiles:
    """Policy files whose loading by unpickling creates ``marker``."""

    def __init__(self, marker: Path):
        self.marker = marker

    def zip(self, path: Path) -> Path:
        """SB3's layout: ``data`` (JSON with cloudpickled entries) and ``policy.pth``."""
        payload = pickle.dumps(_Payload(self.marker))
        data = {"policy_class": {":type:": "<class 'abc.ABCMeta'>",
                                 ":serialized:": base64.b64encode(payload).decode()}}
        with zipfile.ZipFile(path, "w") as z:
            z.writestr("data", json.dumps(data))
            z.writestr("policy.pth", payload)
        return path

    def pickle(self, path: Path) -> Path:
        path.write_bytes(pickle.dumps(_Payload(self.marker)))
        return path

    def torch_file(self, path: Path) -> Path:
        """A torch.save file (a zip, like a real one) whose pickle holds the payload."""
        import torch

        torch.save({"policy": _Payload(self.marker)}, path)
        return path


@pytest.fixture
def hostile(tmp_path) -> HostileFiles:
    return HostileFiles(tmp_path / "payload-ran")


def describe(schedule: Schedule) -> str:
    """Enough to reproduce a failure: the schedule as JSON and its loop nest."""
    return json.dumps(schedule.to_json()) + "\n" + print_loop_nest(schedule)


@pytest.fixture(scope="session")
def run_schedule(check_measurer, target):
    """``run_schedule(schedule) -> MeasureResult``: render, compile, run and compare."""

    def run(schedule: Schedule, for_target=None) -> MeasureResult:
        kernel = render(schedule, for_target or target)
        # keyed by the source: the same code gives the same result, whatever the target said
        return check_measurer.measure_one(Candidate(schedule.op, f"source:{kernel.digest}", kernel))

    return run


@pytest.fixture(scope="session")
def assert_correct(run_schedule):
    """``assert_correct(schedule)``: the kernel builds, runs and matches the reference."""

    def check(schedule: Schedule, for_target=None) -> MeasureResult:
        res = run_schedule(schedule, for_target)
        assert res.ok and res.correct, f"{res.error}\n{describe(schedule)}"
        return res

    return check


# ---------------------------------------------------------------- a checking interpreter

class OutOfBounds(AssertionError):
    """A read or write outside its buffer."""


def eval_value(v, env, read):
    """The value of loop-IR expression ``v`` in ``env``; loads inside their tensor go
    through ``read(buffer, flat index, env)``, reads of padding are 0."""
    if isinstance(v, ir.Load):
        if not all(0 <= e.evaluate(env) < n for e, n in v.bounds):
            return 0.0
        index = v.index
        for e, n, stride in v.clamps:   # index + min(e, n - 1) * stride
            index = index + Lin.constant(min(e.evaluate(env), n - 1) * stride)
        return read(v.buffer, index, env)
    if isinstance(v, ir.Mul):
        return eval_value(v.a, env, read) * eval_value(v.b, env, read)
    if isinstance(v, ir.Add):
        return eval_value(v.a, env, read) + eval_value(v.b, env, read)
    if isinstance(v, ir.Relu):
        return max(eval_value(v.a, env, read), 0.0)
    if isinstance(v, ir.Zero):
        return 0.0
    raise TypeError(v)


def loop_range(s: ir.For, env) -> range:
    """The iterations of loop ``s`` in ``env``: its starts and tail bounds applied."""
    limit = s.extent
    for e, c in s.bounds:
        limit = min(limit, -(-e.evaluate(env) // c))
    return range(max([0] + [e.evaluate(env) for e in s.starts]), limit)


def interpret_lowered(fn, arrays: dict) -> dict:
    """Execute lowered IR on flat float64 arrays, checking that every access is in range.

    Local buffers start as NaN so that reading one before writing it shows up in
    the result. Returns the arrays (inputs, output and local buffers) by name.
    """
    bufs = {name: np.asarray(a, np.float64).reshape(-1).copy() for name, a in arrays.items()}

    def at(buffer, index, env, what):
        i = index.evaluate(env)
        if not 0 <= i < bufs[buffer].size:
            raise OutOfBounds(f"{what} {buffer}[{index}] = {buffer}[{i}] outside [0, {bufs[buffer].size}) "
                              f"at {dict(env)}")
        return i

    def value(v, env):
        return eval_value(v, env, lambda buffer, index, env: bufs[buffer][at(buffer, index, env, "read")])

    def run(stmts, env):
        for s in stmts:
            if isinstance(s, ir.For):
                for v in loop_range(s, env):
                    run(s.body, {**env, s.var: v})
            elif isinstance(s, ir.If):
                if all(e.evaluate(env) < n for e, n in s.conds):
                    run(s.body, env)
            elif isinstance(s, ir.Alloc):
                bufs[s.buffer] = np.full(s.size, np.nan)
            elif isinstance(s, ir.Let):          # defines a variable for the statements after it
                env = {**env, s.var: min(s.value.evaluate(env), s.limit)}
            elif type(s).__name__ == "Sync":       # a GPU barrier: nothing to do serially
                pass
            elif isinstance(s, ir.Store):
                i = at(s.buffer, s.index, env, "write")
                x = value(s.value, env)
                bufs[s.buffer][i] = bufs[s.buffer][i] + x if s.accumulate else x
            else:
                raise TypeError(s)

    run(fn.body, {})
    return bufs


class Interpreter:
    """``interpret(schedule) -> (output, reference)``: run the lowered IR of ``schedule``
    in Python on random inputs, checking every access (raises ``OutOfBounds``)."""

    OutOfBounds = OutOfBounds
    lowered = staticmethod(interpret_lowered)   # (Function, arrays) -> buffers

    def __call__(self, schedule: Schedule, seed: int = 0):
        op = schedule.op
        inputs = op.random_inputs(np.random.default_rng(seed))
        arrays = {**inputs, op.output.name: np.full(op.output.shape, np.nan)}
        bufs = interpret_lowered(lower(schedule), arrays)
        return bufs[op.output.name].reshape(op.output.shape), op.reference(inputs)


@pytest.fixture(scope="session")
def interpret():
    return Interpreter()
