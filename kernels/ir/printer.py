"""The lowered loop nest as indented pseudo-code, for people."""

from __future__ import annotations

from .lower import Add, Commit, For, Fragment, If, Load, Mma, Mul, Relu, Store, Sync, Wait, lower
from .schedule import Schedule


def _fmt_value(v) -> str:
    if isinstance(v, Load):
        idx = " + ".join([str(v.index)] + [f"min({e}, {n - 1})*{st}" for e, n, st in v.clamps])
        s = f"{v.buffer}[{idx}]"
        return f"padded({s})" if v.bounds else s
    if isinstance(v, Mul):
        return f"{_fmt_value(v.a)} * {_fmt_value(v.b)}"
    if isinstance(v, Add):
        return f"{_fmt_value(v.a)} + {_fmt_value(v.b)}"
    if isinstance(v, Relu):
        return f"max({_fmt_value(v.a)}, 0)"
    return "0"


def _dump(stmts, depth: int, out: list[str]) -> None:
    pad = "  " * depth
    for s in stmts:
        if isinstance(s, For):
            lim = f"min({s.extent}, " + ", ".join(f"ceil(({e})/{c})" if c != 1 else str(e)
                                                  for e, c in s.bounds) + ")" if s.bounds else str(s.extent)
            start = "max(0, " + ", ".join(map(str, s.starts)) + ")" if any(e.vars() for e in s.starts) \
                else str(max([0] + [e.evaluate({}) for e in s.starts]))
            kind = "" if s.kind == "serial" else f"  # {s.kind}"
            out.append(f"{pad}for {s.var} in {start}..{lim}:{kind}")
            _dump(s.body, depth + 1, out)
        elif isinstance(s, If):
            out.append(f"{pad}if " + " and ".join(f"{e} < {n}" for e, n in s.conds) + ":")
            _dump(s.body, depth + 1, out)
        elif isinstance(s, Store):
            out.append(f"{pad}{s.buffer}[{s.index}] {'+=' if s.accumulate else '='} {_fmt_value(s.value)}")
        elif isinstance(s, Sync):
            out.append(f"{pad}sync")
        elif isinstance(s, Commit):
            out.append(f"{pad}commit copies")
        elif isinstance(s, Wait):
            out.append(f"{pad}wait until {s.pending} commits pending")
        elif isinstance(s, Fragment):
            regs = ", ".join("(" + ", ".join(_fmt_value(x) for x in reg) + ")" for reg in s.regs)
            out.append(f"{pad}{s.buffer}[{s.index} + 0..{len(s.regs) - 1}] = fragment {regs}")
        elif isinstance(s, Mma):
            (a, ai), (b, bi) = s.a, s.b
            out.append(f"{pad}{s.acc}[{s.base} + 0..3] += mma({a}[{ai} + 0..3], {b}[{bi} + 0..1])")


def print_loop_nest(schedule: Schedule, gpu: bool = False) -> str:
    """The lowered loop nest as indented pseudo-code, for people."""
    fn = lower(schedule, gpu=gpu)
    op = schedule.op
    lines = [f"# {op.kind} {op.shape_str}: " + ", ".join(f"{t.name}{list(t.shape)}" for t in op.tensors)]
    lines += [f"local {b}[{n}]" for b, n in fn.local_buffers.items()]
    lines += [f"shared {b}[{n}]" for b, n in fn.shared_buffers.items()]
    _dump(fn.body, 0, lines)
    return "\n".join(lines)
