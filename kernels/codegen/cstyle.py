"""The C-style renderer base: loop IR -> source, shared by every C-like backend.

Token tables (``param_type``, ``local_decl``, ``relu``, ...) and the statement walk
live here; each backend subclasses and overrides only what differs (tinygrad's
``renderer/cstyle.py`` pattern).
"""

from __future__ import annotations

from ..ir.expr import Lin
from ..ir.lower import Add, Alloc, For, Function, If, Let, Load, Mul, Relu, Store, Zero
from ..target import Target


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
        if isinstance(s, Let):
            return [f"{pad}const int {s.var} = imin({self.expr(s.value)}, {s.limit});"]
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
