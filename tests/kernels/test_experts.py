"""Expert schedules: correct on regular and awkward shapes, and fast-looking code on regular ones."""

from __future__ import annotations

import re

import numpy as np
import pytest

from kernels.experts import expert_schedule
from kernels.ir.ops import OPERATORS, make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule
from kernels.target import Target

SHAPES = {
    "matmul": ["64x64x64", "7x13x5", "1x1x1", "1x17x3", "13x1x29", "31x37x3"],
    "dense_bias_relu": ["64x64x64", "7x13x5", "1x1x1", "5x23x2"],
    "batch_matmul": ["2x32x32x32", "3x7x13x5", "1x1x1x1", "2x1x19x3"],
    "conv2d": ["1,8,16,16,8,3,3,1,1",          # regular, padded
               "1,3,7,7,5,3,3,2,1",            # primes, stride 2, padding
               "2,3,13,11,7,3,3,2,1",
               "1,1,1,1,1,1,1",                # all ones
               "1,2,5,5,3,1,1",                # pointwise
               "1,2,8,8,4,3,3,2,0",
               "1,3,6,6,2,5,5,1,2"],           # padding 2, window 5
    "depthwise_conv2d": ["1,16,16,16,3,3,1,1",
                         "1,3,7,7,3,3,2,1",
                         "2,5,13,13,3,3,1,1",
                         "1,1,1,1,1,1",
                         "1,4,9,9,5,5,2,2",
                         "1,8,9,9,3,3,2,1",          # vectorised over channels: strided,
                         "2,16,11,11,5,5,2,2"],      # narrow, a batch
    "conv2d_bias_relu": ["1,8,16,16,8,3,3,1,1", "2,3,13,11,7,3,3,2,1", "1,2,5,5,3,1,1"],
}
CASES = [(kind, shape) for kind in OPERATORS for shape in SHAPES[kind]]

REGULAR = {"matmul": "64x64x64", "dense_bias_relu": "64x64x64", "batch_matmul": "4x64x64x64",
           "conv2d": "1,16,16,16,16,3,3,1,1", "depthwise_conv2d": "1,16,16,16,3,3,1,1",
           "conv2d_bias_relu": "1,16,16,16,16,3,3,1,1"}

VECTOR_CODE = re.compile(r"\*\(vec\d+\*\)&")   # a load or store through a vector type


def test_every_operator_has_shapes():
    assert set(SHAPES) == set(OPERATORS) == set(REGULAR)


@pytest.mark.parametrize("kind,shape", CASES, ids=[f"{k}-{s}" for k, s in CASES])
def test_expert_schedule_is_correct(kind, shape, target, assert_correct):
    op = make_op(kind, shape)
    schedule = expert_schedule(op, target)
    assert schedule.steps, "an expert schedule does something"
    assert_correct(schedule)


@pytest.mark.parametrize("kind", list(OPERATORS))
def test_expert_schedule_of_a_regular_shape_is_vectorized_and_parallel(kind, target):
    schedule = expert_schedule(make_op(kind, REGULAR[kind]), target)
    source = render(schedule, target).source
    assert VECTOR_CODE.search(source), "no vector loads/stores"
    assert "#pragma omp parallel for" in source
    kinds = {loop.kind for loop in schedule.nest.loops}
    assert {"parallel", "vectorize"} <= kinds
    assert schedule.nest.cache_write is not None


def test_expert_matmul_64_source(target):
    schedule = expert_schedule(make_op("matmul", "64x64x64"), target)
    source = render(schedule, target).source
    assert re.search(r"\bvec\d+\b", source) and VECTOR_CODE.search(source)
    assert "omp parallel" in source
    assert "omp simd" not in source              # every vectorized loop got real vector code


@pytest.mark.parametrize("lanes", [4, 8, 16])
def test_expert_schedules_for_other_vector_widths_are_legal(lanes, target):
    """Schedules for a narrower or wider machine still build (validation runs on apply)."""
    other = Target(target.kind, target.device, target.cores, lanes, target.compiler)
    for kind, shape in CASES:
        schedule = expert_schedule(make_op(kind, shape), other)
        assert Schedule.from_json(schedule.to_json()).steps == schedule.steps


OTHER_WIDTH_CASES = [("matmul", "64x64x64"), ("matmul", "7x13x5"), ("batch_matmul", "2x32x32x32"),
                     ("conv2d", "1,3,7,7,5,3,3,2,1"), ("depthwise_conv2d", "1,16,16,16,3,3,1,1")]


@pytest.mark.parametrize("lanes", [4, 16])
@pytest.mark.parametrize("kind,shape", OTHER_WIDTH_CASES, ids=[f"{k}-{s}" for k, s in OTHER_WIDTH_CASES])
def test_expert_schedules_for_other_vector_widths_are_correct(kind, shape, lanes, target, assert_correct):
    """gcc's vector extensions build any width here, so SSE and AVX-512 tiles can be checked too."""
    other = Target(target.kind, target.device, target.cores, lanes, target.compiler)
    assert_correct(expert_schedule(make_op(kind, shape), other), other)


@pytest.mark.parametrize("kind,shape", [("matmul", "7x13x5"), ("conv2d", "1,3,7,7,5,3,3,2,1"),
                                        ("depthwise_conv2d", "1,3,7,7,3,3,2,1")])
def test_expert_schedule_interpreted_stays_in_range(kind, shape, target, interpret):
    out, ref = interpret(expert_schedule(make_op(kind, shape), target))
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("shape,vectorized", [("1,16,28,28,3,3,2,1", "c_i"), ("1,16,14,14,3,3,1,1", "c_i"),
                                              ("1,16,56,56,3,3,1,1", "x_i"), ("1,12,28,28,3,3,2,1", "x_i")])
def test_depthwise_expert_vectorizes_channels_where_rows_are_strided_or_narrow(shape, vectorized, target):
    """Along a strided or short row a vector gathers or is mostly tail; channels (a vector's
    worth, packed channel-last) do not."""
    wide = Target(target.kind, target.device, target.cores, 16, target.compiler)
    nest = expert_schedule(make_op("depthwise_conv2d", shape), wide).nest
    assert [loop.name for loop in nest.loops if loop.kind == "vectorize"] == [vectorized]


def test_depthwise_expert_packs_a_band_of_rows_where_the_image_is_too_large(target, assert_correct):
    schedule = expert_schedule(make_op("depthwise_conv2d", "1,8,400,400,3,3,2,1"), target)
    assert ("I", "n_c_o") not in schedule.nest.cache_reads and any(t == "I" for t, _ in schedule.nest.cache_reads)
    assert_correct(schedule)


def test_expert_schedule_rejects_other_targets(target):
    tpu = Target("tpu", "some accelerator", 1, 32, "xla")
    with pytest.raises(ValueError, match="no expert schedule for target 'tpu'"):
        expert_schedule(make_op("matmul", "8x8x8"), tpu)


def test_expert_schedule_needs_gpu_limits_on_cuda():
    gpu = Target("cuda", "some gpu", 1, 32, "nvcc")
    with pytest.raises(ValueError, match="no GPU limits"):
        expert_schedule(make_op("matmul", "8x8x8"), gpu)
