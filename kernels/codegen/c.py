"""The C backend: loop IR -> C for gcc.

The C renderer turns ``vectorize`` into GCC vector-extension code (an unaligned
``vecN`` type, loads/stores through it, scalars broadcast by the compiler) when
the loop body allows it: one multiply-accumulate whose accesses are contiguous or
invariant in the loop (an invariant one may be guarded: read once, broadcast), no
tail, an extent that is a multiple of the width. That
keeps a register tile in registers, which gcc's auto-vectorizer alone does not.
Where a ragged tile's reads are clamped along the loop, the loop is rendered twice:
vector code for the tiles where no clamp bites, scalar loops for the last one.
Other vectorized loops fall back to ``#pragma omp simd``. ``unroll`` is done
here, explicitly: one ``{ const int v = c; ... }`` block per iteration. No element
is read under a condition (``guarded``; see ``CRenderer.value``).
"""

from __future__ import annotations

import dataclasses

from ..ir.expr import Lin
from ..ir.lower import For, Load, Mul, Store, lower
from ..ir.schedule import Schedule
from ..target import Target
from .cstyle import CStyleRenderer
from .kernel import Kernel
from .rules import check_for_target


class CRenderer(CStyleRenderer):
    """C for gcc: OpenMP for ``parallel``, vector extensions for ``vectorize``."""

    max_vector_chunks = 8
    # Not fmaxf: without -ffinite-math-only gcc calls libm's fmaxf (through the PLT) for
    # every output, which took half the time of a ReLU convolution's write-back.
    relu = "relu({x})"

    def __init__(self, target: Target):
        super().__init__(target)
        widths = [w for w in (16, 8, 4) if w <= target.vector_lanes]
        self.widths = widths
        self.preamble = ("#include <math.h>",
                         *(f"typedef float vec{w} __attribute__((vector_size({4 * w}), aligned(4)));"
                           for w in widths),
                         "static inline int imin(int a, int b) { return a < b ? a : b; }",
                         "static inline int imax(int a, int b) { return a > b ? a : b; }",
                         "static inline float relu(float x) { return x > 0.0f ? x : 0.0f; }",
                         "static inline float guarded(const float* p, int ok, int i) { union { float f; "
                         "unsigned u; } v = { p[ok ? i : 0] }; v.u &= -(unsigned)ok; return v.f; }",
                         "")

    def pragmas(self, loop: For, depth: int) -> list[str]:
        pad = self.indent * depth
        if loop.kind == "parallel":
            return [f"{pad}#pragma omp parallel for schedule(static)"]
        if loop.kind == "vectorize":
            return [f"{pad}#pragma omp simd"]
        return []

    def for_loop(self, loop: For, depth: int) -> list[str]:
        if loop.kind != "vectorize":
            return super().for_loop(loop, depth)
        width = self.vector_width(loop)
        if not width:
            return self.versioned(loop, depth) or super().for_loop(loop, depth)
        pad = self.indent * depth
        (store,) = loop.body
        op = "+=" if store.accumulate else "="
        value = (f"{self.vector_value(store.value.a, loop.var, width)} * "
                 f"{self.vector_value(store.value.b, loop.var, width)}")
        line = f"*(vec{width}*)&{store.buffer}[{store.index}] {op} {value};"
        if loop.extent // width <= self.max_vector_chunks:  # explicit, so the tile stays in registers
            return [f"{pad}{{ const int {loop.var} = {c}; {line} }}" for c in range(0, loop.extent, width)]
        return [f"{pad}for (int {loop.var} = 0; {loop.var} < {loop.extent}; {loop.var} += {width}) {{",
                pad + self.indent + line, pad + "}"]

    def versioned(self, loop: For, depth: int) -> list[str] | None:
        """A vectorized loop whose reads are clamped along it (a ragged tile of a parallel
        loop reads its last column again rather than past the edge) in two versions: vector
        code where no clamp bites anywhere in the loop (every tile but the last), and for the
        last tile contiguous reads up to the edge, then the edge's value. Rendered as one
        clamped scalar loop, the greedy matmul kernel of 32x100x256 ran 2-4x slower (gathers
        in every tile). None where the loop without its clamps would not vectorize either."""
        s = _product(loop)
        if s is None:
            return None
        clamps = {c for x in (s.value.a, s.value.b) for c in x.clamps if loop.var in c[0].vars()}
        coefs = {e.coef(loop.var) for e, *_ in clamps}
        if not clamps or None in coefs or min(coefs) < 0:   # each clamped value is largest at the last iteration
            return None

        def body(edge: bool) -> list[Store]:
            return [dataclasses.replace(s, value=Mul(*(_unclamped(x, loop.var, edge) for x in (s.value.a, s.value.b))))]

        fast = dataclasses.replace(loop, body=body(False))
        if not self.vector_width(fast):
            return None
        whole = tuple((e.subst(loop.var, Lin.constant(loop.extent - 1)), n) for e, n, _ in sorted(clamps, key=str))
        last_tile = [loop]
        if len({(e, n) for e, n, _ in clamps}) == 1 and coefs == {1}:
            e, n, _ = next(iter(clamps))
            edge = Lin.constant(n) - e.subst(loop.var, Lin.constant(0))   # the first iteration the clamp bites
            last_tile = [dataclasses.replace(fast, bounds=((edge, 1),)),
                         dataclasses.replace(loop, starts=(edge,), body=body(True))]
        pad, scalar = self.indent * depth, super().for_loop
        return ([f"{pad}if ({self.conds(whole)}) {{", *self.for_loop(fast, depth + 1), f"{pad}}} else {{",
                 *(line for part in last_tile for line in scalar(part, depth + 1)), f"{pad}}}"])

    def value(self, v) -> str:
        """A guarded read is never a conditional load (``ok ? A[i] : 0``): gcc 12.2 turns
        that into a masked load, and its SLP vectorizer drops the permutation of a masked
        load that feeds several lanes (GCC PR 114375), which reads the wrong memory.
        ``guarded`` loads unconditionally, from element 0 when outside, and zeroes the
        value with a bitwise select (ARCHITECTURE "Lowering and rendering")."""
        if isinstance(v, Load) and v.bounds:
            return f"guarded({v.buffer}, {self.in_bounds(v)}, {self.offset(v)})"
        return super().value(v)

    def vector_width(self, loop: For) -> int | None:
        """The SIMD width to emit this loop with, or None for the scalar fallback."""
        s = _product(loop)
        if s is None:
            return None
        loads = (s.value.a, s.value.b)
        if any(x.bounds and (x.index.coef(loop.var) != 0 or any(loop.var in e.vars() for e, _ in x.bounds))
               for x in loads):
            return None     # a guarded read along the loop; one invariant in it is read once, a scalar
        if s.index.coef(loop.var) != 1 or any(x.index.coef(loop.var) not in (0, 1) for x in loads):
            return None
        if any(loop.var in e.vars() for x in loads for e, *_ in x.clamps):
            return None
        return next((w for w in self.widths if loop.extent % w == 0), None)

    def vector_value(self, load: Load, var: str, width: int) -> str:
        """A vector of ``width`` elements along ``var``, or a scalar invariant in it (broadcast
        by the compiler; guarded where it can fall in padding: a convolution's input read in
        place, one load for every lane rather than the ``omp simd`` fallback's, which ran the
        strided layer 1,64,56,56,128 2.4x slower than its pack)."""
        if load.index.coef(var) == 0:
            return self.value(load)
        return f"*(vec{width}*)&{self.ref(load)}"


def _product(loop: For) -> Store | None:
    """The loop's one statement where it stores (or accumulates) a product of two reads
    over every iteration (no clipped bounds), else None."""
    if loop.bounds or loop.starts or len(loop.body) != 1:
        return None
    (s,) = loop.body
    if isinstance(s, Store) and isinstance(s.value, Mul) and all(isinstance(x, Load) for x in (s.value.a, s.value.b)):
        return s
    return None


def _unclamped(load: Load, var: str, edge: bool = False) -> Load:
    """``load`` with its clamps along ``var`` taken as not biting (their offsets added as they
    are) or, with ``edge``, as biting (each offset its last row's)."""
    along = [c for c in load.clamps if var in c[0].vars()]
    index = load.index
    for e, n, stride in along:
        index = index + (Lin.constant((n - 1) * stride) if edge else e * stride)
    return dataclasses.replace(load, index=index, clamps=tuple(c for c in load.clamps if c not in along))


def render_c(schedule: Schedule, target: Target, name: str) -> Kernel:
    """Check ``schedule`` against the target's rules, lower it and render C."""
    check_for_target(schedule, target)
    return Kernel(name, CRenderer(target).render(lower(schedule, name)), schedule.op.tensors)
