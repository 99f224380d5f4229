"""Operators of your own (``examples/operators.py``, loaded through $SCHEDGYM_OPERATORS):
no expert, no policy, perhaps no library, and they still tune. The shipped policies and
cost model still load (the observation keeps its size), sketches give the search the
structure of a fast kernel on both targets, a plain contraction is compared against
einsum, and the measuring workers know the operator too."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest

from agents.sketch import sketches
from experiments import pretrained
from kernels.ir import ops
from kernels.ir.ops import OperatorError, make_op
from kernels.measure.library import einsum_spec, library_call, library_name
from tests.kernels.codegen.test_cuda import TARGET as GPU, describe, simulate_schedule

ROOT = Path(__file__).resolve().parents[2]
EXAMPLE = ROOT / "examples" / "operators.py"


@pytest.fixture
def new_ops(monkeypatch):
    """The example's operators registered in this process, removed afterwards."""
    before = dict(ops.OPERATORS)
    ops.load_operators(EXAMPLE)
    yield
    for kind in set(ops.OPERATORS) - set(before):
        del ops.OPERATORS[kind]


def test_shipped_policies_and_cost_models_still_load(new_ops, target):
    """The operator one-hot is the shipped policies' vocabulary, not the registry: a new
    operator shows as zeros, and nothing that was trained changes size."""
    from envs.schedule_env import ScheduleEnv
    old, new = make_op("matmul", "64x64x64"), make_op("matmul_nt", "64x64x64")
    assert pretrained.shipped_policy(old, target) is not None      # sizes checked on load
    shapes = [ScheduleEnv(op=o.kind, shape=o.shape_str, target=target).observation_space.shape for o in (old, new)]
    assert shapes[0] == shapes[1]
    model = pretrained.load_cost_model(None, target)
    assert np.isfinite(model.predict(sketches(new, target, np.random.default_rng(0), 4))).all()


@pytest.mark.parametrize("kind,shape", [("matmul_nt", "24x40x20"), ("conv1d", "2,6,19,16,3"),
                                        ("conv2d_nhwc", "1,7,9,5,16,3,3,2,1")])
def test_a_new_operator_has_correct_sketches_on_both_targets(new_ops, kind, shape, target, interpret):
    op = make_op(kind, shape)
    cpu = sketches(op, target, np.random.default_rng(0), 6)
    gpu = sketches(op, GPU, np.random.default_rng(0), 3)
    assert len(cpu) >= 4 and len(gpu) >= 2
    for s in cpu[:3]:
        out, ref = interpret(s)
        np.testing.assert_allclose(out, ref, rtol=1e-4, atol=1e-4, err_msg=describe(s))
    for s in gpu:
        out, ref = simulate_schedule(s)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=describe(s))


def test_a_plain_contraction_is_compared_with_einsum_and_a_window_with_nothing(new_ops):
    nt, conv = make_op("matmul_nt", "24x40x20"), make_op("conv1d", "2,6,19,16,3")
    assert einsum_spec(nt) == "ac,bc->ab" and einsum_spec(conv) is None
    assert library_name(nt) == "numpy einsum" and library_name(conv) is None and library_name(conv, "cuda") is None
    assert einsum_spec(make_op("dense_bias_relu", "4x4x4")) is None   # an epilogue: its own library call
    inputs = nt.random_inputs(np.random.default_rng(0))
    np.testing.assert_allclose(library_call(nt, inputs)(), nt.reference(inputs), rtol=1e-5, atol=1e-5)
    with pytest.raises(ValueError, match="no library reference"):
        library_call(conv, conv.random_inputs(np.random.default_rng(0)))


def test_register_refuses_what_it_cannot_serve(new_ops):
    with pytest.raises(OperatorError, match="exists already"):
        ops.register("matmul", ops.OPERATORS["matmul"][0], ("M", "N", "K"))
    with pytest.raises(OperatorError, match="lower-case"):
        ops.register("My Op", ops.OPERATORS["matmul"][0], ("M", "N", "K"))


def _cli(*args: str, operators: str) -> subprocess.CompletedProcess:
    env = {**os.environ, ops.OPERATORS_ENV: operators}
    return subprocess.run([sys.executable, "-m", "experiments", *args], capture_output=True, text=True,
                          env=env, cwd=ROOT, timeout=600)


def test_tune_an_operator_of_your_own_end_to_end(tmp_path):
    """The command line and its measuring worker both load the file: the search (sketches,
    no expert, no policy) returns a correct kernel, with no library figure for a window."""
    out = _cli("tune", "--op", "conv1d", "--shape", "1,8,30,16,3", "--budget", "4", "--rounds", "1",
               "--runs", str(tmp_path), "--json", operators=str(EXAMPLE))
    assert out.returncode == 0, out.stderr[-2000:]
    summary = json.loads(out.stdout.strip().splitlines()[-1])
    assert summary["correct"] and summary["library"] is None and summary["fraction_of_library"] is None
    assert summary["expert_gflops"] is None and summary["speedup_vs_naive"] > 0


def test_an_operator_file_that_does_not_load_is_one_line(tmp_path):
    bad = tmp_path / "ops.py"
    bad.write_text("raise RuntimeError('boom')\n")
    for path, message in ((str(bad), "RuntimeError: boom"), (str(tmp_path / "none.py"), "no file")):
        out = _cli("tune", "--op", "matmul", "--shape", "4x4x4", operators=path)
        assert out.returncode == 2 and out.stderr.strip().count("\n") == 0 and message in out.stderr, out.stderr
