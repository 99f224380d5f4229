"""Index expressions: a fused loop read in the order it was fused folds back into one variable;
what a divisor divides is taken out of it for rendering."""

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


def test_what_the_divisor_divides_is_taken_out_for_rendering():
    """A copy's chunk ``t + T*c``: its position steps by a constant from round to round."""
    t, c = Lin.var("t"), Lin.var("c")
    assert str((t + c * 128).floordiv(32).taken_out()) == "c*4 + ((t) / 32)"
    assert (t + c * 128).mod(32).taken_out() == t.mod(32)
    assert (t + c * 128 + 40).floordiv(32).taken_out() == c * 4 + (t + 8).floordiv(32) + 1
    assert (c * 64).mod(32).taken_out() == Lin() and (c * 64 + 70).floordiv(32).taken_out() == c * 2 + 2
    nested = ((t + c * 64).floordiv(8) + c * 4).mod(4)
    assert nested.taken_out() == t.floordiv(8).mod(4)


def test_a_rest_that_could_be_negative_stays_inside():
    """C's ``/`` truncates: taking ``32*c`` out of ``(t - 1 + 32*c) / 32`` would change the
    rendered value at t = 0, so nothing is taken out."""
    t, c = Lin.var("t"), Lin.var("c")
    for e in (t - 1 + c * 32, c * 32 - t):
        assert e.floordiv(32).taken_out() == e.floordiv(32) and e.mod(32).taken_out() == e.mod(32)


def test_taking_out_keeps_values():
    t, c = Lin.var("t"), Lin.var("c")
    exprs = [t + c * 96 + 5, t * 3 + c * 8 + 16, (t + c * 64).floordiv(8) + c * 4]
    for e, d in itertools.product(exprs, (4, 8, 32)):
        for x in (e.floordiv(d) * 3 + e.mod(d), (e.mod(d) + c * d).floordiv(d)):
            y = x.taken_out()
            for tv, cv in itertools.product(range(40), range(5)):
                assert y.evaluate({"t": tv, "c": cv}) == x.evaluate({"t": tv, "c": cv})
