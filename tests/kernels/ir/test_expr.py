"""Index expressions: a fused loop read in the order it was fused folds back into one variable."""

from __future__ import annotations

import itertools

from kernels.codegen import render
from kernels.ir.expr import Lin
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule
from kernels.target import cpu_target


def test_div_and_mod_of_one_expression_fold_back():
    f = Lin.var("f")
    assert f.floordiv(7) * 7 + f.mod(7) + Lin.var("c", 49) == Lin.var("f") + Lin.var("c", 49)
    g = Lin.var("a", 3) + Lin.var("b") + 2
    folded = g.floordiv(5) * 10 + g.mod(5) * 2
    assert folded.vars() == {"a", "b"} and str(folded) == "a*6 + b*2 + 4"


def test_folding_keeps_values():
    g = Lin.var("a", 3) + Lin.var("b")
    cases = [(g.floordiv(4) * 8 + g.mod(4) * 2, lambda v: v // 4 * 8 + v % 4 * 2),
             (g.floordiv(4) * 4 + g.mod(4) * 2, lambda v: v // 4 * 4 + v % 4 * 2),   # not a pair: kept
             (g.mod(6) + g.floordiv(6) * 5, lambda v: v % 6 + v // 6 * 5)]
    for expr, want in cases:
        for a, b in itertools.product(range(9), range(7)):
            assert expr.evaluate({"a": a, "b": b}) == want(3 * a + b)


def test_a_fused_pointwise_convolution_reads_contiguously():
    op = make_op("conv2d", "1,16,8,8,32,1,1,1,0")
    s = Schedule(op).fuse("y", "x").reorder("n", "k", "c", "ry", "rx", "y_x").split("y_x", 16).vectorize("y_x_i")
    source = render(s, cpu_target()).source
    assert "/ 8" not in source and "% 8" not in source      # y = f / 8, x = f % 8 folded away
