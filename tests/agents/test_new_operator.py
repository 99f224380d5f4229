"""An operator added to ``kernels/ir/ops.py`` after the policies and cost models were
trained: it has no expert, no policy and perhaps no library, and still tunes. The shipped
policies and cost model still load (the observation keeps its size), sketches give its
search the structure of a fast kernel on both targets, and a plain contraction is
compared against einsum."""

from __future__ import annotations

import numpy as np
import pytest

from agents.sketch import sketches
from experiments import pretrained
from kernels.ir import ops
from kernels.ir.ops import Access, Affine, Axis, Tensor, make_op
from kernels.measure.library import einsum_spec, library_call, library_name
from tests.kernels.codegen.test_cuda import TARGET as GPU, describe, simulate_schedule


def _matmul_nt(m, n, k):
    """C = A @ B^T, B stored N x K (attention's Q @ K^T)."""
    return dict(axes=(Axis("i", m), Axis("j", n), Axis("k", k, reduce=True)),
                tensors=(Tensor("A", (m, k), "input"), Tensor("B", (n, k), "input"), Tensor("C", (m, n), "output")),
                out=Access("C", (Affine.of("i"), Affine.of("j"))),
                lhs=Access("A", (Affine.of("i"), Affine.of("k"))),
                rhs=Access("B", (Affine.of("j"), Affine.of("k"))),
                reference_fn=lambda A, B: A.astype(np.float64) @ B.T)


def _conv1d(n, c, w, k, s):
    """A 1-D convolution: a window, so no einsum and no library."""
    ow = w - s + 1
    window = np.lib.stride_tricks.sliding_window_view
    return dict(axes=(Axis("n", n), Axis("k", k), Axis("x", ow), Axis("c", c, True), Axis("rx", s, True)),
                tensors=(Tensor("I", (n, c, w), "input"), Tensor("W", (k, c, s), "input"),
                         Tensor("O", (n, k, ow), "output")),
                out=Access("O", (Affine.of("n"), Affine.of("k"), Affine.of("x"))),
                lhs=Access("I", (Affine.of("n"), Affine.of("c"), Affine.of("x", "rx"))),
                rhs=Access("W", (Affine.of("k"), Affine.of("c"), Affine.of("rx"))),
                reference_fn=lambda I, W: np.einsum("ncxs,kcs->nkx", window(I.astype(np.float64), s, axis=2), W))


@pytest.fixture
def new_ops(monkeypatch):
    monkeypatch.setitem(ops.OPERATORS, "matmul_nt", (_matmul_nt, ("M", "N", "K"), 0))
    monkeypatch.setitem(ops.OPERATORS, "conv1d", (_conv1d, ("N", "C", "W", "K", "S"), 0))


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


@pytest.mark.parametrize("kind,shape", [("matmul_nt", "24x40x20"), ("conv1d", "2,6,19,16,3")])
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
