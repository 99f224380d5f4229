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


@pytest.mark.parametrize("kind,shape", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_a_sketch_never_gathers_its_vectors(kind, shape, target):
    """An input read along the vector axis in an outer dimension is always packed: read in
    place every vector would be a gather (a conv2d's weights along the output channels)."""
    op = make_op(kind, shape)
    axes = vector_axes(op, target.vector_lanes)
    for s in sketches(op, target, np.random.default_rng(5), 30):
        strided = axes[s.nest.loops[-1].axis][1]
        assert set(strided) <= {t for t, _ in s.nest.cache_reads}, [str(x) for x in s.steps]


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


# ---------------------------------------------------------------- GPU sketches

from kernels.codegen.rules import launch_config  # noqa: E402
from kernels.experts import expert_schedule  # noqa: E402
from kernels.ir.schedule import bound_axis  # noqa: E402
from tests.kernels.codegen.test_cuda import (TARGET as GPU, describe, needs_nvcc, nvcc_compile,  # noqa: E402
                                             simulate_schedule)

GPU_SHAPES = {   # small: the simulator runs every thread in Python
    "matmul": ["96x64x48", "33x129x20", "1x40x17"],
    "dense_bias_relu": ["48x40x24"],
    "batch_matmul": ["3x32x48x16", "2x1x19x3"],
    "conv2d": ["1,8,10,10,16,3,3,1,1", "2,3,13,11,7,3,3,2,1", "2,8,7,7,16,1,1"],
    "conv2d_bias_relu": ["1,8,9,9,8,3,3,1,1"],
    "depthwise_conv2d": ["1,16,16,16,3,3,1,1", "2,5,13,13,5,5,2,2"],
}
GPU_CASES = [(kind, shape) for kind in OPERATORS for shape in GPU_SHAPES[kind]]


@pytest.mark.parametrize("kind,shape", GPU_CASES, ids=[f"{k}-{s}" for k, s in GPU_CASES])
def test_gpu_sketches_are_multi_level_tilings(kind, shape):
    """Plentiful, legal on the GPU, and shaped like a GPU kernel: blocks outermost, then
    the threads (threadIdx.x along the output's innermost axis where it has threads), the
    output cached at the innermost thread loop, the reductions and the tile inside it."""
    op = make_op(kind, shape)
    drawn = sketches(op, GPU, np.random.default_rng(0), 30)
    assert len(drawn) >= (10 if shape == GPU_SHAPES[kind][0] else 3)
    for s in drawn:
        assert legal(op, s.steps, GPU) is not None
        if s.nest.tensorized:   # fp32 on tensor cores: warps (test_tensorized_gpu_sketches_simulate_correctly)
            continue
        loops, nest = s.nest.loops, s.nest
        threads = [l for l in loops if (bound_axis(l) or "").startswith("threadIdx")]
        assert threads and nest.cache_write == threads[-1].name
        inside = nest.inside(nest.cache_write)
        assert not any(bound_axis(l) for l in inside)
        assert all(l.kind in ("unroll", "vectorize") for l in inside if not l.reduce)
        x = [l for l in threads if bound_axis(l) == "threadIdx.x"]
        assert x and (x[0].axis == op.out.index[-1].terms[0][0] or
                      all(l.axis != op.out.index[-1].terms[0][0] for l in threads))


@pytest.mark.parametrize("kind,shape", GPU_CASES, ids=[f"{k}-{s}" for k, s in GPU_CASES])
def test_gpu_sketches_simulate_correctly(kind, shape):
    """Run on the simulated GPU (tests/kernels/codegen/test_cuda.py): no race, no output
    written twice or not at all, the reference's result."""
    for s in sketches(make_op(kind, shape), GPU, np.random.default_rng(1), 3):
        out, ref = simulate_schedule(s)
        np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=describe(s))


def test_gpu_sketches_stage_and_pipeline_the_inputs():
    op = make_op("matmul", "256x256x256")
    drawn = sketches(op, GPU, np.random.default_rng(2), 40)
    assert sum(bool(s.nest.cache_reads) for s in drawn) >= 20
    assert sum(bool(s.nest.double_buffered) for s in drawn) >= 5
    assert len({launch_config(s.nest) for s in drawn}) >= 10


def test_the_fp32_matmul_expert_is_a_gpu_sketch():
    """The sketch's structure holds the hand-written kernel: with its tile, threads and
    slice, the sketch builds the expert's very loop nest."""
    from agents.sketch import gpu_tiling
    from kernels.experts import _matmul_tile
    op = make_op("matmul", "1024x1024x1024")
    tm, tn, ty, tx, bk = _matmul_tile(op, GPU)
    s = gpu_tiling(op, GPU, {"i": tm, "j": tn}, {"i": ty, "j": tx}, bk, ("A", "B"), buffers=2)
    assert s.kernel_key() == expert_schedule(op, GPU).kernel_key()


@pytest.mark.parametrize("shape", ["1,64,56,56,64,3,3,1,1", "1,256,14,14,256,3,3,1,1"])
def test_the_fp32_conv2d_expert_is_a_gpu_sketch(shape):
    """The same for the direct convolution, up to loop names and loops of one iteration."""
    from agents.sketch import gpu_tiling
    from kernels.codegen.rules import shared_bytes
    from kernels.experts import _conv_tile
    op = make_op("conv2d", shape)
    tk, xw, tz, ty, tx, cb = _conv_tile(op, GPU)
    s = gpu_tiling(op, GPU, {"k": tk, "x": xw}, {"k": tz, "y": ty, "x": tx}, cb, ("I", "W"), 1, unroll_reduce=2)

    def structure(s):
        return ([(l.extent, l.kind, l.reduce, l.axis) for l in s.nest.loops if l.extent > 1],
                launch_config(s.nest), shared_bytes(op, s.nest))

    assert structure(s) == structure(expert_schedule(op, GPU))


def test_the_mma_matmul_expert_is_a_tensorized_sketch():
    """The tensor-core (mma.sync) expert of a bf16 product, rebuilt from its tiles."""
    from agents.sketch import tensor_tiling
    from kernels.experts import _gpu_matmul_tensor_cores
    op = make_op("matmul", "1024x1024x1024", "bf16")
    s = tensor_tiling(op, GPU, ("i", "j", "k"), (2, 2), (2, 2), 2, 4)   # the expert's tile at 1024
    assert s.kernel_key() == _gpu_matmul_tensor_cores(op, GPU, False).kernel_key()


TENSOR_CASES = [("matmul", "48x40x32", "bf16"), ("matmul", "32x24x16", "tf32"), ("dense_bias_relu", "40x16x32", "fp16"),
                ("batch_matmul", "2x32x16x32", "bf16"), ("conv2d", "1,16,4,18,16,3,3,1,1", "bf16"),
                ("conv2d", "16,16,3,3,8,1,1,1,0", "tf32"), ("matmul", "48x40x32", "fp32"),
                ("conv2d", "16,16,3,3,8,1,1,1,0", "fp32")]


@pytest.mark.parametrize("kind,shape,dtype", TENSOR_CASES)
def test_tensorized_gpu_sketches_simulate_correctly(kind, shape, dtype):
    """In a dtype with tensor cores most sketches tensorize (fp32: a quarter); they run
    right on the simulated GPU (mma.sync fragments as the PTX ISA lays them out)."""
    op = make_op(kind, shape, dtype)
    drawn = sketches(op, GPU, np.random.default_rng(4), 24 if dtype == "fp32" else 8)
    tensorized = [s for s in drawn if s.nest.tensorized]
    assert len(tensorized) >= 3
    for s in tensorized[:2] + [s for s in drawn if not s.nest.tensorized][:1]:
        out, ref = simulate_schedule(s)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


def test_without_a_policy_the_gpu_search_measures_sketches():
    """Both inputs staged, the output cached at the innermost thread loop and the tile
    vectorized: random rollouts alone assemble that almost never (none of 16 here)."""
    op = make_op("matmul", "256x256x256")
    search = Search(op, GPU, _FakeMeasurer(GPU), budget=16)
    AGENTS["evolve"](search, np.random.default_rng(0), model=_Indifferent())

    def tiled(s):
        threads = [l for l in s.nest.loops if (bound_axis(l) or "").startswith("threadIdx")]
        return (len(s.nest.cache_reads) == 2 and threads and s.nest.cache_write == threads[-1].name
                and s.nest.loops[-1].kind == "vectorize")

    assert sum(bool(tiled(s)) for s in search.schedules.values()) >= 8


@needs_nvcc
def test_gpu_sketches_compile_with_nvcc(tmp_path):
    cases = [(kind, shape, "fp32") for kind, shape in GPU_CASES] + TENSOR_CASES + \
        [("matmul", "1024x1024x1024", "fp32"), ("conv2d", "1,256,14,14,256,3,3,1,1", "fp32"),
         ("matmul", "1024x1024x1024", "bf16"), ("conv2d", "1,64,56,56,64,3,3,1,1", "bf16")]
    drawn = [s for kind, shape, dtype in cases for s in sketches(make_op(kind, shape, dtype), GPU, np.random.default_rng(3), 2)]
    nvcc_compile([render(s, GPU, name=f"sketch{n}").source for n, s in enumerate(drawn)], tmp_path)
