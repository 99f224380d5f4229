"""Renderers: loop IR -> source code. A C-style base; each backend overrides what differs.

The C renderer turns ``vectorize`` into GCC vector-extension code (an unaligned
``vecN`` type, loads/stores through it, scalars broadcast by the compiler) when
the loop body allows it: one multiply-accumulate whose accesses are contiguous or
invariant in the loop, no tail, an extent that is a multiple of the width. That
keeps a register tile in registers, which gcc's auto-vectorizer alone does not.
Other vectorized loops fall back to ``#pragma omp simd``. ``unroll`` is done
here, explicitly: one ``{ const int v = c; ... }`` block per iteration. No element
is read under a condition (``guarded``; see ``CRenderer.value``).
"""

from __future__ import annotations

from .expr import Lin
from .kernel import Kernel
from .lower import Add, Alloc, For, Function, If, Load, Mul, Relu, Store, Zero, lower
from .schedule import Schedule
from .target import Target


class CStyleRenderer:
    """What every C-like language shares: statements, expressions, guards."""

    indent = "  "
    function_prefix = "void"
    param_type = "float* restrict"
    local_decl = "float {name}[{size}] __attribute__((aligned(64)));"
    relu = "fmaxf({x}, 0.0f)"
    preamble: tuple[str, ...] = ()

    def __init__(self, target: Target):
        self.target = target

    def expr(self, e: Lin) -> str:
        """An index expression in the target language."""
        return str(e)

    # ------------------------------------------------------------ entry point
    def render(self, fn: Function) -> str:
        params = ", ".join(f"{self.param_type} {t.name}" for t in fn.params)
        lines = list(self.preamble)
        lines.append(f"{self.function_prefix} {fn.name}({params}) {{")
        for s in fn.body:
            lines += self.stmt(s, 1)
        lines.append("}")
        return "\n".join(lines) + "\n"

    # ------------------------------------------------------------ statements
    def stmt(self, s, depth: int) -> list[str]:
        pad = self.indent * depth
        if isinstance(s, For):
            return self.for_loop(s, depth)
        if isinstance(s, If):
            return self.block(f"{pad}if ({self.conds(s.conds)}) {{", s.body, depth)
        if isinstance(s, Alloc):
            return [pad + self.local_decl.format(name=s.buffer, size=s.size)]
        if isinstance(s, Store):
            return [f"{pad}{s.buffer}[{self.expr(s.index)}] {'+=' if s.accumulate else '='} {self.value(s.value)};"]
        raise TypeError(f"cannot render {s!r}")

    def block(self, head: str, body: list, depth: int) -> list[str]:
        lines = [head]
        for s in body:
            lines += self.stmt(s, depth + 1)
        return lines + [self.indent * depth + "}"]

    def limit(self, loop: For) -> str:
        lim = str(loop.extent)
        for e, c in loop.bounds:
            b = f"({self.expr(e)})" if c == 1 else f"(({self.expr(e)}) + {c - 1}) / {c}"
            lim = f"imin({lim}, {b})"
        return lim

    def start(self, loop: For) -> str:
        """The first iteration: max(0, each of ``loop.starts``), constants folded."""
        fixed = max([0] + [e.evaluate({}) for e in loop.starts if not e.vars()])
        first = str(fixed)
        for e in loop.starts:
            if e.vars():
                first = f"imax({first}, {self.expr(e)})"
        return first

    def for_loop(self, loop: For, depth: int) -> list[str]:
        if loop.kind == "unroll":
            return self.unrolled(loop, depth)
        pad = self.indent * depth
        v = loop.var
        head = f"{pad}for (int {v} = {self.start(loop)}; {v} < {self.limit(loop)}; ++{v}) {{"
        return self.pragmas(loop, depth) + self.block(head, loop.body, depth)

    def pragmas(self, loop: For, depth: int) -> list[str]:
        return []

    def unrolled(self, loop: For, depth: int) -> list[str]:
        pad = self.indent * depth
        lines = []
        for c in range(loop.extent):
            if loop.bounds or loop.starts:
                first = f"{self.start(loop)} <= {c} && " if loop.starts else ""
                head = f"{pad}if ({first}{c} < {self.limit(loop)}) {{ const int {loop.var} = {c};"
            else:
                head = f"{pad}{{ const int {loop.var} = {c};"
            lines += self.block(head, loop.body, depth)
        return lines

    # ------------------------------------------------------------ expressions
    def offset(self, load: Load) -> str:
        clamps = "".join(f" + imin({self.expr(e)}, {n - 1})*{stride}" for e, n, stride in load.clamps)
        return f"{self.expr(load.index)}{clamps}"

    def ref(self, load: Load) -> str:
        return f"{load.buffer}[{self.offset(load)}]"

    def in_bounds(self, load: Load) -> str:
        """The condition under which a guarded read is inside its tensor."""
        return " && ".join(f"0 <= {self.expr(e)} && {self.expr(e)} < {n}" for e, n in load.bounds)

    def conds(self, conds) -> str:
        return " && ".join(f"{self.expr(e)} < {n}" for e, n in conds)

    def value(self, v) -> str:
        if isinstance(v, Load):
            ref = self.ref(v)
            if not v.bounds:
                return ref
            return f"(({self.in_bounds(v)}) ? {ref} : 0.0f)"
        if isinstance(v, Mul):
            return f"{self.value(v.a)} * {self.value(v.b)}"
        if isinstance(v, Add):
            return f"({self.value(v.a)} + {self.value(v.b)})"
        if isinstance(v, Relu):
            return self.relu.format(x=self.value(v.a))
        if isinstance(v, Zero):
            return "0.0f"
        raise TypeError(f"cannot render {v!r}")


class CRenderer(CStyleRenderer):
    """C for gcc: OpenMP for ``parallel``, vector extensions for ``vectorize``."""

    max_vector_chunks = 8

    def __init__(self, target: Target):
        super().__init__(target)
        widths = [w for w in (16, 8, 4) if w <= target.vector_lanes]
        self.widths = widths
        self.preamble = ("#include <math.h>",
                         *(f"typedef float vec{w} __attribute__((vector_size({4 * w}), aligned(4)));"
                           for w in widths),
                         "static inline int imin(int a, int b) { return a < b ? a : b; }",
                         "static inline int imax(int a, int b) { return a > b ? a : b; }",
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
        width = self.vector_width(loop) if loop.kind == "vectorize" else None
        if not width:
            return super().for_loop(loop, depth)
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
        if loop.bounds or loop.starts or len(loop.body) != 1:
            return None
        (s,) = loop.body
        if not (isinstance(s, Store) and isinstance(s.value, Mul)
                and all(isinstance(x, Load) and not x.bounds for x in (s.value.a, s.value.b))):
            return None
        loads = (s.value.a, s.value.b)
        if s.index.coef(loop.var) != 1 or any(x.index.coef(loop.var) not in (0, 1) for x in loads):
            return None
        if any(loop.var in e.vars() for x in loads for e, *_ in x.clamps):
            return None
        return next((w for w in self.widths if loop.extent % w == 0), None)

    def vector_value(self, load: Load, var: str, width: int) -> str:
        ref = self.ref(load)
        return ref if load.index.coef(var) == 0 else f"*(vec{width}*)&{ref}"


def render(schedule: Schedule, target: Target, name: str | None = None) -> Kernel:
    """Lower and render ``schedule`` for ``target`` into a callable kernel.

    Rules that depend on the target (GPU binds, thread and shared-memory limits) are
    checked here, where the target is known: a ``ScheduleError`` names the rule.
    """
    from .cuda import check_for_target, render_cuda  # it builds on this module

    op = schedule.op
    name = name or f"{op.kind}_{'_'.join(map(str, op.shape))}"
    if target.kind == "cuda":
        return render_cuda(schedule, target, name)
    check_for_target(schedule, target)
    fn = lower(schedule, name)
    if target.kind != "cpu":
        raise ValueError(f"no renderer for target {target.kind!r}")
    return Kernel(name, CRenderer(target).render(fn), op.tensors)
