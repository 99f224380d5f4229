"""Lowering: the printed loop nest, tails of non-divisible splits, padding.

Besides compiling and running kernels, these tests execute the lowered IR with a
small interpreter (``interpret`` in conftest) that checks every read and write
against the size of its buffer, which a correct-looking result alone would not.
"""

from __future__ import annotations

import re

import numpy as np
import pytest

from kernels.experts import expert_schedule
from kernels.ir.expr import Lin
from kernels.ir.lower import For, If, Load, Store, Zero, lower
from kernels.ir.printer import print_loop_nest
from kernels.ir.ops import make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule, footprint, footprint_shape

LOOP_LINE = re.compile(r"^(\s*)for (\w+) in 0\.\.(.+?):(?:  # (\S+))?$")


def loops_and_kinds(text: str) -> list[tuple[str, str]]:
    """(loop, kind) for every ``for`` line of a printed nest, in order."""
    out = []
    for line in text.splitlines():
        m = LOOP_LINE.match(line)
        if m:
            out.append((m.group(2), m.group(4) or "serial"))
    return out


def walk(stmts):
    for s in stmts:
        yield s
        if isinstance(s, (For, If)):
            yield from walk(s.body)


def loads(value):
    if isinstance(value, Load):
        yield value
    for name in ("a", "b"):
        if hasattr(value, name):
            yield from loads(getattr(value, name))


def assert_interpreted_exact(interpret, schedule):
    out, ref = interpret(schedule)           # raises on any out-of-range access
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------- print_loop_nest

def test_print_naive_matmul():
    text = print_loop_nest(Schedule(make_op("matmul", "4x5x6")))
    assert text.splitlines()[0] == "# matmul 4x5x6: A[4, 6], B[6, 5], C[4, 5]"
    assert loops_and_kinds(text) == [("C_z", "serial"), ("i", "serial"), ("j", "serial"), ("k", "serial")]
    assert "C[i*5 + j] += A[i*6 + k] * B[k*5 + j]" in text
    # loops are nested: each one indented one level deeper
    indents = [len(LOOP_LINE.match(l).group(1)) for l in text.splitlines() if LOOP_LINE.match(l)][1:]
    assert indents == [0, 2, 4]


def test_print_shows_every_loop_and_its_kind():
    s = (Schedule(make_op("matmul", "16x16x16"))
         .tile("i", "j", 4, 8)
         .reorder("i_o", "j_o", "k", "i_i", "j_i")
         .cache_write("j_o").vectorize("j_i").unroll("i_i").parallel("i_o")
         .cache_read("B", "j_o"))
    text = print_loop_nest(s)
    kinds: dict[str, str] = {}
    for name, kind in loops_and_kinds(text):
        kinds.setdefault(name, kind)   # the compute loops; the write-back repeats the tile's names
    assert kinds["i_o"] == "parallel"
    assert kinds["i_i"] == "unroll"
    assert kinds["j_i"] == "vectorize"
    assert kinds["j_o"] == "serial" and kinds["k"] == "serial"
    # every loop of the nest appears, outermost first
    order = [name for name, _ in loops_and_kinds(text) if name in s.nest.extents]
    assert order[:5] == ["i_o", "j_o", "k", "i_i", "j_i"]
    assert "local C_local[32]" in text and "local B_local[128]" in text
    assert "for i_o in 0..4:  # parallel" in text
    assert "for j_i in 0..8:  # vectorize" in text


def test_print_of_expert_schedule_names_its_annotations(target):
    text = print_loop_nest(expert_schedule(make_op("matmul", "64x64x64"), target))
    kinds = {k for _, k in loops_and_kinds(text)}
    assert {"parallel", "unroll", "vectorize"} <= kinds


# ---------------------------------------------------------------- tails of non-divisible splits

TAILS = [
    ("split-i", lambda s: s.split("i", 4)),
    ("split-j", lambda s: s.split("j", 4)),
    ("split-k-reduce", lambda s: s.split("k", 2)),
    ("split-all", lambda s: s.split("i", 4).split("j", 2).split("k", 2)),
    ("split-twice", lambda s: s.split("i", 3).split("i_o", 2)),
    ("split-then-reorder", lambda s: s.split("i", 4).reorder("i_i", "j", "i_o")),
    ("tile", lambda s: s.tile("i", "j", 4, 4)),
    ("tile-cache-write", lambda s: s.tile("i", "j", 4, 4).reorder("k", "i_i").cache_write("j_o")),
    ("tile-cache-write-vectorize",
     lambda s: (s.tile("i", "j", 2, 4).reorder("k", "i_i", "j_i")
                .cache_write("j_o").vectorize("j_i").unroll("i_i"))),
    ("split-cache-read", lambda s: s.split("k", 2).cache_read("A", "k_o").cache_read("B", "i")),
    ("split-parallel-unroll", lambda s: s.split("i", 4).parallel("i_o").split("k", 2).unroll("k_i")),
]


def test_non_divisible_split_bounds_the_inner_loop(target):
    s = Schedule(make_op("matmul", "7x5x3")).split("i", 4)
    assert loops_and_kinds(print_loop_nest(s))[1:] == [
        ("i_o", "serial"), ("i_i", "serial"), ("j", "serial"), ("k", "serial")]
    fn = lower(s)
    (inner,) = [x for x in walk(fn.body) if isinstance(x, For) and x.var == "i_i"]
    assert inner.extent == 4 and inner.bounds, "the tail must be bounded"
    text = print_loop_nest(s)
    assert "for i_o in 0..2:" in text
    assert re.search(r"for i_i in 0\.\.min\(4, ", text), text
    assert "imin(" in render(s, target).source


@pytest.mark.parametrize("make", [t[1] for t in TAILS], ids=[t[0] for t in TAILS])
def test_non_divisible_split_stays_in_range(make, interpret):
    s = make(Schedule(make_op("matmul", "7x5x3")))
    assert s.nest.guards, "the case must have a tail"
    assert_interpreted_exact(interpret, s)


@pytest.mark.parametrize("make", [t[1] for t in TAILS], ids=[t[0] for t in TAILS])
def test_non_divisible_split_is_correct_compiled(make, assert_correct, target):
    s = make(Schedule(make_op("matmul", "7x5x3")))
    assert "imin(" in render(s, target).source
    assert_correct(s)


def test_interpreter_catches_an_out_of_range_read(interpret):
    """The check is real: a loop that drops its tail bound goes past the buffers."""
    s = Schedule(make_op("matmul", "7x5x3")).split("i", 4)
    fn = lower(s)
    for x in walk(fn.body):
        if isinstance(x, For) and x.var == "i_i":
            x.bounds = ()
    op = s.op
    inputs = op.random_inputs(np.random.default_rng(0))
    with pytest.raises(interpret.OutOfBounds, match=r"outside \[0, "):
        interpret.lowered(fn, {**inputs, "C": np.zeros(op.output.shape)})


# ---------------------------------------------------------------- padding

PADDED = ["1,2,5,5,3,3,3,1,1", "1,2,7,7,3,3,3,2,1", "2,1,3,3,2,1,1,1,1", "1,3,4,5,2,3,2,2,1"]
DW_PADDED = ["1,3,5,5,3,3,1,1", "2,2,7,6,3,2,2,1"]


def _padded_ops():
    return ([make_op("conv2d", s) for s in PADDED] + [make_op("depthwise_conv2d", s) for s in DW_PADDED])


def _cache_read_variants(op):
    return [("direct", Schedule(op)),
            ("cache-read-at-n", Schedule(op).cache_read("I", "n")),
            ("cache-read-at-y", Schedule(op).cache_read("I", "y")),
            ("cache-read-at-x", Schedule(op).cache_read("I", "x")),
            ("cache-read-split-y",
             Schedule(op).split("y", 2).reorder("y_o", "x", "y_i").cache_read("I", "y_o"))]


PADDING_CASES = [(f"{op.kind}-{op.shape_str}-{name}", s) for op in _padded_ops()
                 for name, s in _cache_read_variants(op)]


@pytest.mark.parametrize("schedule", [c[1] for c in PADDING_CASES], ids=[c[0] for c in PADDING_CASES])
def test_padding_reads_zero_interpreted(schedule, interpret):
    assert_interpreted_exact(interpret, schedule)


@pytest.mark.parametrize("schedule", [c[1] for c in PADDING_CASES], ids=[c[0] for c in PADDING_CASES])
def test_padding_reads_zero_compiled(schedule, assert_correct):
    assert_correct(schedule)


def test_padding_is_checked_directly_and_not_through_cache_read():
    op = make_op("conv2d", "1,2,5,5,3,3,3,1,1")
    direct = print_loop_nest(Schedule(op))
    assert "padded(I[" in direct                           # a zero-or-load read

    cached = Schedule(op).cache_read("I", "n")
    fn = lower(cached)
    stores = [x for x in walk(fn.body) if isinstance(x, Store)]
    compute = [st for st in stores if st.accumulate]
    (compute,) = compute
    reads = {ld.buffer: ld for ld in loads(compute.value)}
    assert set(reads) == {"I_local", "W"}
    assert not reads["I_local"].bounds                     # the pack holds the zeros
    (pack,) = [st for st in stores if st.buffer == "I_local" and not isinstance(st.value, Zero)]
    assert pack.value.buffer == "I" and not pack.value.bounds   # zeroed, then the inside copied
    packing = [x for x in walk(fn.body) if isinstance(x, For) and re.fullmatch(r"I_local_\d", x.var)]
    copy = [x for x in packing if any(y is pack for y in walk(x.body))]
    assert [bool(x.starts) for x in copy] == [False, False, True, True]  # rows and columns clipped
    # the packed buffer covers the padded input: 2 channels of (5 + 2) x (5 + 2)
    assert fn.local_buffers["I_local"] == 2 * 7 * 7


def test_padding_without_need_has_no_check(target):
    op = make_op("conv2d", "1,2,5,5,3,3,3,1,0")
    assert "padded(" not in print_loop_nest(Schedule(op))
    def body(op):  # the kernel function, without the preamble's helpers
        return render(Schedule(op), target).source.split("\nvoid ", 1)[1]

    assert "guarded(" not in body(op)
    assert "guarded(" in body(make_op("conv2d", "1,2,5,5,3,3,3,1,1"))


def test_a_pointwise_conv_with_padding_has_a_zero_border(assert_correct, interpret):
    # 1x1 window, padding 1: the border of the output sees only padding
    op = make_op("conv2d", "1,2,3,3,2,1,1,1,1")
    out, ref = interpret(Schedule(op))
    assert out.shape == (1, 2, 5, 5)
    assert np.all(out[:, :, 0, :] == 0) and np.all(out[:, :, :, -1] == 0)
    np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5)
    assert_correct(Schedule(op))
    assert_correct(Schedule(op).cache_read("I", "n"))


# ---------------------------------------------------------------- fused loops

def test_fused_loop_indexes_by_div_and_mod(assert_correct, interpret):
    s = Schedule(make_op("matmul", "3x5x2")).fuse("i", "j")
    text = print_loop_nest(s)
    assert "for i_j in 0..15:" in text
    assert re.search(r"\(\(?i_j\)? / 5\)", text) and re.search(r"\(\(?i_j\)? % 5\)", text), text
    assert_interpreted_exact(interpret, s)
    assert_correct(s)


def test_division_of_a_sum_prints_with_parentheses(interpret):
    """C must see ``(a + b) / 5``, not ``a + b / 5``: what a split of a fused loop produces."""
    e = (Lin.var("a") + Lin.var("b")).floordiv(5)
    m = (Lin.var("a", 2) + Lin.var("b") + 1).mod(5)
    env = {"a": 3, "b": 4}
    assert e.evaluate(env) == 1 and m.evaluate(env) == 1
    # evaluate the printed text with C's integer semantics (non-negative operands)
    assert eval(str(e).replace("/", "//"), {}, env) == 1, str(e)
    assert eval(str(m), {}, env) == 1, str(m)


SPLIT_FUSED = [
    ("split-fused", lambda s: s.fuse("i", "j").split("i_j", 2)),
    ("split-fused-tail", lambda s: s.fuse("i", "j").split("i_j", 3)),
    ("split-fused-twice", lambda s: s.fuse("i", "j").split("i_j", 4).split("i_j_o", 3)),
    ("refuse-split-fused", lambda s: s.fuse("i", "j").split("i_j", 4).fuse("i_j_o", "i_j_i")),
    ("split-fused-reduce", lambda s: s.split("k", 2).fuse("k_o", "k_i").split("k_o_k_i", 3)),
    ("split-fused-parallel-cache-write",
     lambda s: s.fuse("i", "j").split("i_j", 4).parallel("i_j_o").cache_write("i_j_i")),
]


@pytest.mark.parametrize("make", [c[1] for c in SPLIT_FUSED], ids=[c[0] for c in SPLIT_FUSED])
def test_split_of_a_fused_loop(make, interpret, assert_correct, target):
    s = make(Schedule(make_op("matmul", "4x5x3")))
    assert_interpreted_exact(interpret, s)          # the IR is right ...
    source = render(s, target).source
    assert not re.search(r"\(\w+\*\d+ \+ \w+ [/%] \d+\)", source), source   # ... and so is its C
    assert_correct(s)


PACKED_THROUGH_FUSED = [
    ("outer-part-in-the-box", lambda s: s.fuse("i", "j").split("i_j", 4).reorder("i_j_o", "k", "i_j_i")
     .cache_read("A", "k").cache_read("B", "k")),
    ("whole-fused-loop-inside", lambda s: s.fuse("i", "j").reorder("k", "i_j").cache_read("A", "k")),
    ("convolution-rows-of-a-run-of-pixels", None),
]


@pytest.mark.parametrize("make", [c[1] for c in PACKED_THROUGH_FUSED], ids=[c[0] for c in PACKED_THROUGH_FUSED])
def test_a_pack_through_a_fused_loop_holds_the_box_its_run_spans(make, interpret, assert_correct):
    """``(o + t) / W`` for an outer part o and an inner run t spans at most
    ``(W - gcd(o, W) + t_max) / W + 1`` values from ``o / W``: the pack holds those rows
    whichever run a block takes, including a run that crosses the tensor's end."""
    if make is None:   # 7 x 5 pixels in runs of 8 (the last one ragged), a 3 x 3 window
        op = make_op("conv2d", "1,2,7,5,3,3,3,1,1")
        s = Schedule(op).fuse("y", "x").split("y_x", 8).reorder("n", "y_x_o", "k", "c", "ry", "rx", "y_x_i")
        s = s.cache_read("I", "c")
        dims = footprint(op, s.nest, "I", "c")
        assert [d[2] for d in dims] == [1, 1, 5, 7], "rows spanned by 8 pixels from any run start, + halo"
    else:
        s = make(Schedule(make_op("matmul", "5x7x3")))
    assert_interpreted_exact(interpret, s)
    assert_correct(s)


def test_a_pointwise_convolution_packs_its_run_of_fused_pixels_as_one_row(interpret, assert_correct):
    """Fused pixels read without a window, stride or padding index the input as ``E / W``
    and ``E % W``: the pack holds the run E of the flattened image (8 pixels), not the rows
    it spans, and the ragged last run stops at the image's end."""
    op = make_op("conv2d", "2,3,5,7,4,1,1,1,0")
    s = Schedule(op).fuse("y", "x").split("y_x", 8).reorder("n", "y_x_o", "k", "c", "ry", "rx", "y_x_i")
    s = s.cache_read("I", "c")
    dims = footprint(op, s.nest, "I", "c")
    assert [d[2] for d in dims] == [1, 1, 8] and footprint_shape(op, "I", dims) == (2, 3, 35)
    assert_interpreted_exact(interpret, s)
    assert_correct(s)


# ---------------------------------------------------------------- shifted tail tiles

def _tiled(shape: str, parallel: bool = False) -> Schedule:
    """A 4x16 register tile of matmul over i and j; the j tiles have a tail at 20 columns."""
    s = (Schedule(make_op("matmul", shape)).tile("i", "j", 4, 16).reorder("i_o", "j_o", "k", "i_i", "j_i")
         .cache_write("j_o").vectorize("j_i").unroll("i_i"))
    return s.parallel("i_o") if parallel else s


def test_a_tail_tile_is_shifted_back_and_reads_contiguously(interpret, target):
    s = _tiled("8x20x5")
    source = render(s, target).source
    assert "const int j_o_s = imin(j_o*16, 4);" in source
    reads = [line for line in source.splitlines() if "B[" in line]
    assert reads and all("imin" not in line for line in reads) and any("*(vec16*)&B[" in line for line in reads)
    assert_interpreted_exact(interpret, s)


def test_a_tile_is_not_shifted_where_threads_would_share_its_outputs(target):
    s = (Schedule(make_op("matmul", "8x20x5")).tile("i", "j", 4, 16).reorder("j_o", "i_o", "k", "i_i", "j_i")
         .cache_write("i_o").vectorize("j_i").unroll("i_i").parallel("j_o"))
    assert "_s = imin(" not in render(s, target).source         # j_o is parallel: clamped instead
    fn_plain = lower(_tiled("8x20x5"), shift_tails=False)
    assert not any(type(x).__name__ == "Let" for x in walk(fn_plain.body))


def _parallel_ragged(shape: str) -> Schedule:
    return (Schedule(make_op("matmul", shape)).tile("i", "j", 4, 16).reorder("j_o", "i_o", "k", "i_i", "j_i")
            .cache_write("i_o").vectorize("j_i").unroll("i_i").parallel("j_o"))


def test_a_clamped_vector_loop_runs_vector_code_on_its_full_tiles(assert_correct, target):
    """Where a parallel ragged tile clamps its reads, the full tiles still get vector code
    and the ragged one reads contiguously up to the edge, then the edge's value."""
    source = render(_parallel_ragged("8x20x5"), target).source
    assert "if (j_o*16 + 15 < 20) {" in source and "*(vec16*)&B[" in source
    assert "for (int j_i = 0; j_i < imin(16, (j_o*-16 + 20)); ++j_i)" in source
    assert "for (int j_i = imax(0, j_o*-16 + 20); j_i < 16; ++j_i)" in source and "+ 19]" in source
    for shape in ("8x20x5", "7x33x9", "13x17x3", "4x16x3"):
        assert_correct(_parallel_ragged(shape))


def test_shifted_tiles_are_correct_compiled(assert_correct):
    for shape in ("8x20x5", "7x33x9", "13x17x3"):
        assert_correct(_tiled(shape))


# ---------------------------------------------------------------- packs follow the loops

def test_a_pack_stores_its_dimensions_in_the_order_the_tile_reads_them(assert_correct, interpret, target):
    """Vectorised over output channels, the weights' pack is channel-last: contiguous vectors."""
    op = make_op("conv2d", "1,8,7,7,32,3,3,2,1")
    s = (Schedule(op).split("k", 16).split("x", 4).reorder("n", "k_o", "y", "x_o", "c", "ry", "rx", "x_i", "k_i")
         .cache_write("x_o").vectorize("k_i").unroll("x_i").cache_read("W", "k_o").cache_read("I", "y"))
    source = render(s, target).source
    assert re.search(r"\*\(vec\d+\*\)&W_local\[c\*144 \+ ry\*48 \+ rx\*16 \+ k_i\]", source)   # k innermost
    assert_interpreted_exact(interpret, s)
    assert_correct(s)
