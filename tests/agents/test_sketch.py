"""Sketches: legal, compiled and correct for every operator, reproducible, shaped like a
fast CPU kernel; and the evolutionary search draws on them without a policy."""

from __future__ import annotations

import dataclasses

import numpy as np
import pytest

from agents.evolution import _factor, legal
from agents.search import AGENTS, Search
from agents.sketch import sketch, sketches, vector_axes
from kernels.codegen import render
from kernels.ir.ops import OPERATORS, make_op
from kernels.target import Target

from test_evolution import _FakeMeasurer, _Model

# regular and awkward shapes of every operator (primes, strides, padding, tiny extents)
SHAPES = {
    "matmul": ["64x64x64", "31x37x13", "1x17x3"],
    "dense_bias_relu": ["48x40x24", "5x23x2"],
    "batch_matmul": ["3x32x48x16", "2x1x19x3"],
    "conv2d": ["1,16,12,12,32,3,3,1,1", "2,3,13,11,7,3,3,2,1", "1,8,7,7,16,1,1", "1,3,6,6,2,5,5,1,2"],
    "conv2d_bias_relu": ["1,8,10,10,16,3,3,1,1"],
    "depthwise_conv2d": ["1,16,16,16,3,3,1,1", "1,3,7,7,3,3,2,1", "2,5,13,13,5,5,2,2"],
}
CASES = [(kind, shape) for kind in OPERATORS for shape in SHAPES[kind]]


def test_every_operator_has_shapes():
    assert set(SHAPES) == set(OPERATORS)


@pytest.mark.parametrize("lanes", [8, 16])
@pytest.mark.parametrize("kind,shape", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_sketches_are_legal_and_render(kind, shape, lanes, target):
    """Many sketches of every operator: each replays, passes the target's rules and renders."""
    t = dataclasses.replace(target, vector_lanes=lanes)
    op = make_op(kind, shape)
    drawn = sketches(op, t, np.random.default_rng(0), 40)
    assert drawn and (shape != SHAPES[kind][0] or len(drawn) >= 10), "distinct sketches are plentiful"
    for s in drawn:
        assert legal(op, s.steps, t) is not None
        render(s, t)


@pytest.mark.parametrize("kind,shape", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_sketches_compile_and_are_correct(kind, shape, target, assert_correct):
    for s in sketches(make_op(kind, shape), target, np.random.default_rng(1), 3):
        assert_correct(s)


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_a_sketch_is_a_parallel_register_tile(kind, target):
    """Vectorized innermost (whole vectors where the axis allows), an unrolled tile under a
    cache_write outside every reduction loop, the outermost loop parallel."""
    op = make_op(kind, SHAPES[kind][0])
    for s in sketches(op, target, np.random.default_rng(2), 20):
        loops = s.nest.loops
        assert loops[-1].kind == "vectorize"
        assert loops[-1].extent % target.vector_lanes == 0 or loops[-1].extent == op.extents[loops[-1].axis]
        assert s.nest.cache_write is not None
        inside = s.nest.inside(s.nest.cache_write)
        assert all(l.kind in ("unroll", "vectorize") for l in inside if not l.reduce)
        assert loops[0].kind == "parallel"


def test_sketches_are_deterministic_under_a_seed(target):
    op = make_op("conv2d", "1,16,12,12,32,3,3,1,1")
    first = [s.key() for s in sketches(op, target, np.random.default_rng(7), 16)]
    again = [s.key() for s in sketches(op, target, np.random.default_rng(7), 16)]
    assert first == again and len(set(first)) == 16


def test_an_input_read_along_the_vector_in_an_outer_dimension_must_be_packed(target):
    """Vectorizing a convolution's output channels reads the weights (OIHW) with a stride:
    the axis qualifies with W to pack; a strided window's columns (x at stride 2) do not."""
    axes = vector_axes(make_op("conv2d", "1,16,12,12,32,3,3,2,1"), target.vector_lanes)
    assert "k" in axes and axes["k"][1] == ("W",)
    assert "x" not in axes and "y" not in axes
    assert vector_axes(make_op("matmul", "64x64x64"), 16)["j"][1] == ()


def test_an_operator_without_a_vector_axis_has_no_sketch_and_still_tunes(target):
    op = make_op("matmul", "1x1x1")
    assert sketch(op, target, np.random.default_rng(0)) is None
    search = Search(op, target, _FakeMeasurer(target), budget=2)
    AGENTS["evolve"](search, np.random.default_rng(0), model=_Model())   # random rollouts only
    assert len(search.measured) >= 1


class _Indifferent(_Model):
    """Predicts every schedule the same: the search keeps its proposals' order."""

    def predict(self, schedules):
        return np.zeros(len(schedules))


def test_the_evolutionary_search_without_a_policy_measures_sketches(target):
    op = make_op("matmul", "64x64x64")
    search = Search(op, target, _FakeMeasurer(target), budget=16)
    AGENTS["evolve"](search, np.random.default_rng(0), model=_Indifferent())
    vectorized = [s for s in search.schedules.values() if s.nest.loops[-1].kind == "vectorize"]
    assert len(vectorized) >= 8


class _DoneAtOnce:
    """A policy that ends every schedule at once: its samples are all the naive kernel."""

    def predict(self, observation, action_masks, deterministic):
        return np.flatnonzero(action_masks)[-1], None   # done, the table's last action


def test_sketches_propose_beside_a_policy_on_a_cpu(target):
    """A policy's samples alone would hold only what it learned (here: nothing); sketches
    among them bring the structure of a fast kernel into the population."""
    op = make_op("matmul", "64x64x64")
    search = Search(op, target, _FakeMeasurer(target), budget=16)
    AGENTS["evolve"](search, np.random.default_rng(0), model=_Indifferent(), policy=_DoneAtOnce())
    vectorized = [s for s in search.schedules.values() if s.nest.loops[-1].kind == "vectorize"]
    assert len(vectorized) >= 4


def test_mutations_reach_vector_multiples_and_divisors():
    rng = np.random.default_rng(0)
    drawn = {_factor(1024, 8, 16, rng) for _ in range(2000)}
    assert {16, 32, 48, 64, 128, 256, 512} <= drawn and 8 not in drawn
    assert max(_factor(14, 2, 16, rng) for _ in range(200)) < 14
    assert {_factor(14, 2, 16, rng) for _ in range(200)} >= {7}


def test_sketches_for_a_narrower_machine_use_its_lanes(target):
    narrow = Target(target.kind, target.device, target.cores, 8, target.compiler)
    for s in sketches(make_op("matmul", "64x64x64"), narrow, np.random.default_rng(3), 20):
        assert s.nest.loops[-1].extent % 8 == 0
