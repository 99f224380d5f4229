"""Guarded reads (padding, tails of packed panels) in the C kernels: no conditional loads.

gcc 12.2 miscompiles some kernels whose source reads a tensor under a condition
(``ok ? A[i] : 0.0f``): if-conversion turns the read into a masked load, and the
loop vectorizer's SLP drops the permutation of a masked load that feeds several
lanes (GCC PR tree-optimization/114375, fixed in later releases), so the kernel
reads the wrong memory. A pack (``cache_read``) now zeroes its buffer and copies
only the part of the box inside the tensor; a direct read of padding goes through
``guarded``, which loads unconditionally and zeroes with a bitwise select.

The two schedules here came out of random search (values up to 1e33 and NaN,
changing from run to run); both are a parallel loop of one iteration around a
cached, unrolled tile whose A panel runs past the last row.
"""

from __future__ import annotations

import numpy as np
import pytest

from kernels.ir.lower import For, Load, Store, lower
from kernels.ir.ops import make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule

_TILE_UNDER_ONE_THREAD = [
    {"step": "CacheRead", "tensor": "A", "loop": "i_o_i"},
    {"step": "CacheRead", "tensor": "B", "loop": "i_i_o"},
    {"step": "CacheWrite", "loop": "i_o_o"},
    {"step": "Unroll", "loop": "k"}, {"step": "Unroll", "loop": "j"}, {"step": "Unroll", "loop": "i_i_i"},
    {"step": "Parallel", "loop": "i_o_o"}]
REGRESSIONS = {
    "matmul 8x32x5": ("8x32x5", [
        {"step": "Split", "loop": "i", "factor": 3},
        {"step": "Tile", "outer": "i_o", "inner": "i_i", "outer_factor": 3, "inner_factor": 3},
        *_TILE_UNDER_ONE_THREAD]),
    "matmul 5x16x9": ("5x16x9", [
        {"step": "Split", "loop": "i", "factor": 2},
        {"step": "Tile", "outer": "i_o", "inner": "i_i", "outer_factor": 3, "inner_factor": 2},
        *_TILE_UNDER_ONE_THREAD]),
}


def regression(name: str) -> Schedule:
    shape, steps = REGRESSIONS[name]
    return Schedule.from_json({"op": "matmul", "shape": shape, "steps": steps})


def kernel_body(schedule: Schedule, target) -> str:
    """The C function, without the preamble's helpers."""
    return "void " + render(schedule, target).source.split("\nvoid ", 1)[1]


@pytest.mark.parametrize("name", REGRESSIONS)
def test_cached_unrolled_tile_under_a_one_iteration_parallel_loop(name, assert_correct, interpret):
    schedule = regression(name)
    out, ref = interpret(schedule)      # the IR is right...
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    for _ in range(3):                  # ...and so must the compiled kernel be, every time
        assert_correct(schedule)


@pytest.mark.parametrize("schedule", [
    regression("matmul 8x32x5"),
    Schedule(make_op("conv2d", "1,3,7,7,4,3,3,2,1")),
    Schedule(make_op("conv2d", "1,3,7,7,4,3,3,1,2")).cache_read("I", "k"),
    Schedule(make_op("depthwise_conv2d", "1,3,7,7,3,3,1,1")).cache_read("I", "c"),
], ids=["tail pack", "padding read", "padding pack", "depthwise padding pack"])
def test_no_element_is_read_under_a_condition(schedule, target, assert_correct):
    body = kernel_body(schedule, target)
    assert "?" not in body, body
    assert ("guarded(" in body) == (not schedule.nest.cache_reads), body
    assert_correct(schedule)


def test_an_input_read_in_place_is_one_guarded_scalar_per_vector_of_outputs(target, assert_correct):
    """A convolution vectorized along output channels reads its input in place, padding
    included: each input element is one guarded scalar, broadcast across the vector of
    channels, not an ``omp simd`` loop calling ``guarded`` lane by lane."""
    lanes = target.vector_lanes
    s = (Schedule(make_op("conv2d", f"1,3,7,7,{2 * lanes},3,3,2,1")).split("k", lanes)
         .reorder("n", "k_o", "y", "c", "ry", "rx", "x", "k_i").vectorize("k_i").unroll("x")
         .cache_write("y").cache_read("W", "k_o"))   # O and W along channels contiguous, I in place
    body = kernel_body(s, target)
    assert "guarded(I" in body and "omp simd" not in body, body
    assert f"*(vec{lanes}*)&O" in body, body
    assert_correct(s)


def test_a_pack_zeroes_its_buffer_and_copies_the_inside_only():
    op = make_op("conv2d", "1,2,5,6,3,3,3,1,1")
    fn = lower(Schedule(op).cache_read("I", "k"))
    stores = list(_walk(fn.body))
    zero, copy = [s for s in stores if isinstance(s, Store) and s.buffer == "I_local"]
    assert zero.value == type(zero.value)() and copy.value == Load("I", copy.value.index)
    loops = {s.var: s for s in stores if isinstance(s, For) and s.var.startswith("I_local_")}
    assert [str(e) for e in loops["I_local_2"].starts] == ["1"]     # row -1 is padding
    assert [str(e) for e in loops["I_local_3"].starts] == ["1"]     # so is column -1
    assert [(str(e), c) for e, c in loops["I_local_3"].bounds] == [("7", 1)]   # and column 6
    assert not loops["I_local_1"].starts and not loops["I_local_1"].bounds
    # its faces outside the tensor cut every row (a column each side): zeroing all of it
    # first takes fewer stores
    assert "I_local_z" in loops


def test_a_pack_with_a_ragged_tile_zeroes_only_what_lies_past_the_tensor():
    """B packed per 32-column tile of a 40-column matmul: only the last tile's 24 columns
    past the edge are zeroed (each row's run of them), not the whole pack of every tile."""
    op = make_op("matmul", "16x40x8")
    s = Schedule(op).tile("i", "j", 8, 32).reorder("j_o", "i_o", "k", "i_i", "j_i").cache_read("B", "j_o")
    fn = lower(s)
    stores = list(_walk(fn.body))
    *zeros, copy = [x for x in stores if isinstance(x, Store) and x.buffer == "B_local"]
    assert len(zeros) == 1 and copy.value.buffer == "B"
    assert not any(isinstance(x, For) and x.var == "B_local_z" for x in stores)
    face = [x for x in stores if isinstance(x, For) and x.var.startswith("B_local_") and zeros[0] in list(_walk(x.body))]
    assert [bool(x.starts) for x in face] == [False, True]     # every k row, from the edge on


def _walk(stmts):
    for s in stmts:
        yield s
        yield from _walk(getattr(s, "body", ()))
