"""Schedules: an operator plus a tuple of frozen step records.

A schedule starts as the operator's loop nest, one loop per axis in declaration
order (spatial axes, then reduce axes), and each step transforms it. Steps use
TVM/Halide names:

================  ==========================================================
``Split``         ``loop`` -> ``loop_o`` (outer, ``ceil(extent/factor)``) and
                  ``loop_i`` (inner, ``factor``). A factor that does not divide
                  the extent is legal: the tail is guarded (loop bounds are
                  clipped with ``min``), so results stay exact.
``Reorder``       the named loops take, in the given order, the positions that
                  the same loops occupy now; other loops stay where they are.
``Tile``          sugar: split ``outer`` and ``inner`` and reorder to
                  ``outer_o, inner_o, outer_i, inner_i``.
``Fuse``          two adjacent loops (outer directly around inner, both spatial
                  or both reduce) -> one loop ``outer_inner``.
``Vectorize``     SIMD: the innermost loop, spatial.
``Unroll``        explicit unrolling of a loop of at most ``MAX_UNROLL``, whose
                  inner loops are all unrolled or vectorized already (a
                  register tile: code size stays bounded by ``MAX_UNROLLED_BODY``).
``Parallel``      OpenMP over the outermost loop (spatial; fuse loops first to
                  give it more iterations).
``Bind``          (GPU) a spatial loop runs as ``blockIdx.x/y/z`` or
                  ``threadIdx.x/y/z``: one block or thread per iteration. Each
                  axis is bound once; blockIdx loops lie outside threadIdx loops.
                  Target rules (CUDA only, thread limits) are checked where the
                  target is known: :func:`kernels.codegen.rules.check_for_target`.
``CacheWrite``    accumulate in a local tile covering the spatial loops inside
                  ``loop`` (every reduce loop must be inside it); the tile is
                  written back once, with the epilogue applied there.
``CacheRead``     copy the part of ``tensor`` read inside ``loop`` into a
                  contiguous local buffer (zero-filled where the index falls
                  outside the tensor, which removes padding checks).
``DoubleBuffer``  (GPU) ``tensor``'s shared stage holds two slices: while the
                  block computes on one, the next iteration of the stage's loop
                  is copied into the other asynchronously (``cp.async``).
                  Applied again, one slice more (up to :data:`MAX_BUFFERS`): a
                  deeper pipeline, slices copied further ahead.
``Tensorize``     (GPU) the three innermost loops, an (m, n, k) tile of
                  16 x 8 x ``mma_k`` (16; 8 for tf32 and fp32), become one
                  tensor-core instruction (``mma.sync.m16n8k*``) that a warp of 32
                  threads executes together: each thread of the nest becomes a
                  warp (:data:`WARP`). m's axis must index the output and the
                  left operand only, n's the output and the right operand only,
                  k must be a reduction over both operands, with no tail.
                  fp32 runs as 3xTF32 (:mod:`kernels.ir.dtypes`).
``Warpgroup``     (GPU, Hopper, tf32/bf16/fp16) the tensorized tile issued by
                  warpgroups (four consecutive warps) as one ``wgmma`` per k
                  step of 64 rows by up to 256 columns, both operands read from
                  shared stages through descriptors (:func:`warpgroup_tile`
                  says what the nest must look like).
================  ==========================================================

A step that cannot apply raises :class:`ScheduleError` naming the step and why.
Only steps are stored (JSON via :meth:`Schedule.to_json`); loops, code and
everything else are derived by replaying them.
"""

from __future__ import annotations

import json
import math
import threading
from dataclasses import dataclass, field, fields, replace
from functools import cached_property
from typing import ClassVar

from .dtypes import DTYPES
from .expr import Lin
from .ops import Access, Operator, make_op

MAX_UNROLL = 64          # extent of one unrolled loop
MAX_UNROLLED_BODY = 512  # product of the extents of all unrolled loops (code size)
MAX_LOCAL_BYTES = 1 << 20  # per local buffer: they live on the stack
# The split and tile factors the environment's actions offer (envs/actions.py); the
# experts keep to them, so that they replay as actions and the policies can imitate them.
# 7: image rows of 7, 14, 28 and 56 pixels, as convolutional networks have, tile by it.
FACTORS = (2, 3, 4, 6, 7, 8, 16, 32, 64)
WARP = 32                # threads that execute one tensor-core instruction together
MMA_M, MMA_N = 16, 8     # the instruction's output tile (m16n8k16, m16n8k8)


class ScheduleError(ValueError):
    """A step that cannot be applied; the message names the step and the reason."""


def check(cond: bool, step: "Step", reason: str) -> None:
    if not cond:
        raise ScheduleError(f"{step}: {reason}")


# ---------------------------------------------------------------- loops and state

@dataclass(frozen=True)
class Loop:
    name: str
    extent: int
    reduce: bool
    axis: str                # the op axis it came from (the outer one for fused loops)
    kind: str = "serial"     # serial | parallel | vectorize | unroll | bind:<thread axis>


@dataclass(frozen=True)
class LoopNest:
    """The loop structure a schedule denotes; loops run outermost first."""

    loops: tuple[Loop, ...]
    axis_expr: tuple[tuple[str, Lin], ...]   # op axis -> expression over loop variables
    guards: tuple[tuple[Lin, int], ...]      # each (e, n) means e < n (tails of splits)
    cache_write: str | None = None
    cache_reads: tuple[tuple[str, str], ...] = ()  # (tensor, loop)
    tensorized: tuple[str, ...] = ()   # (m, n, k) loops run as one tensor-core instruction
    double_buffered: tuple[str, ...] = ()  # tensors whose stage is filled ahead, once per DoubleBuffer
    warpgroup: bool = False            # the tensorized tile is issued by warpgroups (wgmma)
    _memo: dict = field(default_factory=dict, init=False, compare=False, repr=False)

    def access_exprs(self, access: Access) -> tuple[Lin, ...]:
        """Per tensor dimension, ``access``'s index over loop variables (memoized)."""
        key = access.tensor  # one access per tensor in an operator
        if key not in self._memo:
            self._memo[key] = compose(access, self.axis_map)
        return self._memo[key]

    def index(self, name: str) -> int:
        for i, loop in enumerate(self.loops):
            if loop.name == name:
                return i
        raise KeyError(name)

    def loop(self, name: str) -> Loop:
        return self.loops[self.index(name)]

    def has(self, name: str) -> bool:
        return any(loop.name == name for loop in self.loops)

    def buffers(self, tensor: str) -> int:
        """Slices that ``tensor``'s stage holds: 1, or for a stage filled asynchronously the
        pipeline depth of its loop, which every such stage there shares (one group of copies
        per iteration): one more than the most ``DoubleBuffer`` steps any of them took."""
        if tensor not in self.double_buffered:
            return 1
        anchor = dict(self.cache_reads)[tensor]
        return 1 + max(self.double_buffered.count(t) for t, at in self.cache_reads if at == anchor)

    @property
    def axis_map(self) -> dict[str, Lin]:
        return dict(self.axis_expr)

    @property
    def extents(self) -> dict[str, int]:
        return {loop.name: loop.extent for loop in self.loops}

    def inside(self, name: str) -> tuple[Loop, ...]:
        """Loops strictly inside ``name``."""
        return self.loops[self.index(name) + 1:]

    def anchors(self) -> set[str]:
        return ({self.cache_write} if self.cache_write else set()) | {l for _, l in self.cache_reads}

    def kernel_repr(self) -> str:
        """The nest as the kernel's identity: without its loops of extent 1 (one runs once
        wherever it stands and however it is annotated; its variable is 0), but for those
        a cache stage is anchored at or an instruction folds; its stages deepened in any
        order (only how often each was counts)."""
        if ("kernel",) not in self._memo:
            keep = self.anchors() | set(self.tensorized)
            unit = [l.name for l in self.loops if l.extent == 1 and l.name not in keep]

            def zero(e: Lin) -> Lin:
                for name in unit:
                    e = e.subst(name, Lin.constant(0))
                return e

            self._memo[("kernel",)] = repr(replace(
                self, loops=tuple(l for l in self.loops if l.name not in unit),
                axis_expr=tuple((a, zero(e)) for a, e in self.axis_expr),
                guards=tuple((zero(e), n) for e, n in self.guards),
                double_buffered=tuple(sorted(self.double_buffered))))
        return self._memo[("kernel",)]


def compose(access: Access, axis_map: dict[str, Lin]) -> tuple[Lin, ...]:
    """``access``'s index, one expression per tensor dimension, with each op axis
    replaced by its expression in ``axis_map``."""
    out = []
    for aff in access.index:
        e = Lin.constant(aff.const)
        for axis, coef in aff.terms:
            e = e + axis_map[axis] * coef
        out.append(e)
    return tuple(out)


def initial_nest(op: Operator) -> LoopNest:
    axes = sorted(op.axes, key=lambda a: a.reduce)  # spatial first, stable
    loops = tuple(Loop(a.name, a.extent, a.reduce, a.name) for a in axes)
    return LoopNest(loops, tuple((a.name, Lin.var(a.name)) for a in op.axes), ())


def tile_shape(nest: LoopNest) -> tuple[Loop, ...]:
    """The spatial loops covered by the cache_write tile."""
    return tuple(l for l in nest.inside(nest.cache_write) if not l.reduce)


def footprint(op: Operator, nest: LoopNest, tensor: str, anchor: str, also: tuple[Loop, ...] = ()):
    """Per tensor dimension: (base expression over outer loops, inner expression, extent).

    The part of ``tensor`` that the loops inside ``anchor`` read, as a box: the buffer's
    index is the inner expression, from 0 to extent - 1. Loops in ``also`` count as inside
    too: on a GPU, the threadIdx loops, since a block's shared stage holds what all its
    threads read. Through a fused loop (``(o + t) / W``, ``(o + t) % W``: outer part o,
    inner t) the box bounds what any outer part gives; None only where an inner loop lies
    under two divisions or moduli. Where the last two dimensions are read as ``E / W`` and
    ``E % W`` with W the tensor's row (pixels fused and read without a window, stride or
    padding), they are one run ``E`` of the tensor's last two dimensions flattened: a box
    one dimension shorter, over the shape :func:`footprint_shape` gives.
    """
    access = next(a for a in op.accesses if a.tensor == tensor)
    inner = {l.name: l.extent for l in nest.inside(anchor)}
    inner.update({l.name: l.extent for l in also})
    dims = []
    for e in _unfused(nest.access_exprs(access), op.tensor(tensor).shape[-1], nest):
        dim = _box_dim(e, inner)
        if dim is None:
            return None
        dims.append(dim)
    return dims


def footprint_shape(op: Operator, tensor: str, dims) -> tuple[int, ...]:
    """The shape of ``tensor`` as its footprint ``dims`` index it: the last two dimensions
    flattened into one where the footprint is one dimension shorter (see :func:`footprint`)."""
    shape = op.tensor(tensor).shape
    return shape if len(dims) == len(shape) else (*shape[:-2], shape[-2] * shape[-1])


def _unfused(exprs: tuple[Lin, ...], row: int, nest: LoopNest) -> tuple[Lin, ...]:
    """``exprs`` with a last pair ``(E / row, E % row)`` (beside terms that are always 0:
    loops of one iteration) replaced by ``E``, the pair's offset in the flattened rows."""
    def fused(e: Lin, kind: str) -> Lin | None:
        atoms = [(a, c) for a, c in e.terms if not isinstance(a, str)]
        if len(atoms) != 1 or atoms[0][1] != 1 or atoms[0][0].op != kind or atoms[0][0].divisor != row:
            return None
        return atoms[0][0].arg if (e - Lin(((atoms[0][0], 1),))).range(nest.extents) == (0, 0) else None
    if len(exprs) < 2:
        return exprs
    run = fused(exprs[-2], "div")
    return (*exprs[:-2], run) if run is not None and run == fused(exprs[-1], "mod") else exprs


def _box_dim(e: Lin, inner: dict[str, int]) -> tuple[Lin, Lin, int] | None:
    """(base, inner expression, extent) of one index expression (see :func:`footprint`)."""
    base, part, lo, hi = Lin.constant(e.const), Lin(), 0, 0
    for atom, c in e.terms:
        term = Lin(((atom, c),))
        if isinstance(atom, str) and atom in inner:
            part, (a, b) = part + term, (0, inner[atom] - 1)
        elif isinstance(atom, str) or not atom.arg.vars() & inner.keys():
            base += term
            continue
        else:
            arg, d = atom.arg, atom.divisor
            outer = Lin(tuple((x, k) for x, k in arg.terms if not (isinstance(x, str) and x in inner)), arg.const)
            if outer.vars() & inner.keys():   # an inner loop under two divisions or moduli
                return None
            if not outer.terms:                # the whole argument runs inside: exact
                part, (a, b) = part + term, Lin(((atom, 1),)).range(inner)
            elif atom.op == "mod":
                part, (a, b) = part + term, (0, d - 1)
            else:   # (o + t) / d = o / d + (o % d + t) / d, and o % d is a multiple of gcd(o, d)
                in_lo, in_hi = (arg - outer).range(inner)
                rest = d - math.gcd(d, outer.const, *(k for _, k in outer.terms))
                whole = outer.floordiv(d) * c
                base += whole
                part, (a, b) = part + term - whole, (in_lo // d, (rest + in_hi) // d)
        lo, hi = lo + min(c * a, c * b), hi + max(c * a, c * b)
    return base + lo, part - lo, hi - lo + 1


# ---------------------------------------------------------------- steps

@dataclass(frozen=True)
class Step:
    """One schedule transformation; a frozen, hashable value."""

    registry: ClassVar[dict[str, type["Step"]]] = {}

    def __init_subclass__(cls, **kw):
        super().__init_subclass__(**kw)
        Step.registry[cls.__name__] = cls

    def apply(self, op: Operator, nest: LoopNest) -> LoopNest:
        raise NotImplementedError

    def _loop(self, nest: LoopNest, name: str) -> Loop:
        check(nest.has(name), self, f"no loop named {name!r} (loops: {', '.join(l.name for l in nest.loops)})")
        return nest.loop(name)

    def _unannotated(self, nest: LoopNest, name: str) -> Loop:
        loop = self._loop(nest, name)
        check(loop.kind == "serial", self, f"loop {name!r} is already marked {loop.kind}")
        return loop

    def _set_kind(self, nest: LoopNest, name: str, kind: str) -> LoopNest:
        loop = self._unannotated(nest, name)
        loops = list(nest.loops)
        loops[nest.index(name)] = replace(loop, kind=kind)
        return replace(nest, loops=tuple(loops))

    def to_json(self) -> dict:
        d = {"step": type(self).__name__}
        for f in fields(self):
            v = getattr(self, f.name)
            d[f.name] = list(v) if isinstance(v, tuple) else v
        return d

    @staticmethod
    def from_json(d: dict) -> "Step":
        if not isinstance(d, dict):
            raise ScheduleError(f"a step must be a JSON object, got {d!r}")
        name = d.get("step")
        cls = Step.registry.get(name) if isinstance(name, str) else None
        if cls is None:
            raise ScheduleError(f"unknown step {name!r} (known: {', '.join(Step.registry)})")
        args = {k: v for k, v in d.items() if k != "step"}
        expected = {f.name: f.type for f in fields(cls)}
        if set(args) != set(expected):
            raise ScheduleError(f"bad fields for {name}: needs {sorted(expected)}, got {sorted(args)}")
        shown = f"{name}({', '.join(repr(args[f]) for f in expected)})"
        for k, v in args.items():  # types here; values are checked by apply()
            kind = expected[k]
            if kind.startswith("tuple"):
                if not (isinstance(v, list) and all(isinstance(x, str) for x in v)):
                    raise ScheduleError(f"{shown}: {k} must be a list of loop names, got {v!r}")
                args[k] = tuple(v)
            elif kind == "int" and (not isinstance(v, int) or isinstance(v, bool)):
                raise ScheduleError(f"{shown}: {k} must be an integer, got {v!r}")
            elif kind == "str" and not isinstance(v, str):
                raise ScheduleError(f"{shown}: {k} must be a string, got {v!r}")
        return cls(**args)

    def __str__(self) -> str:
        args = ", ".join(repr(getattr(self, f.name)) for f in fields(self))
        return f"{type(self).__name__}({args})"


@dataclass(frozen=True)
class Split(Step):
    loop: str
    factor: int

    def apply(self, op, nest):
        loop = self._unannotated(nest, self.loop)
        check(self.loop not in nest.anchors(), self, f"loop {self.loop!r} anchors a cache stage")
        whole = isinstance(self.factor, int) and not isinstance(self.factor, bool)
        check(whole and 1 <= self.factor <= loop.extent, self, f"factor must be an integer in [1, {loop.extent}]")
        outer = Loop(f"{loop.name}_o", -(-loop.extent // self.factor), loop.reduce, loop.axis)
        inner = Loop(f"{loop.name}_i", self.factor, loop.reduce, loop.axis)
        repl = Lin.var(outer.name, self.factor) + Lin.var(inner.name)
        guards = tuple((e.subst(loop.name, repl), n) for e, n in nest.guards)
        if loop.extent % self.factor:
            guards += ((repl, loop.extent),)
        i = nest.index(loop.name)
        return replace(nest, loops=nest.loops[:i] + (outer, inner) + nest.loops[i + 1:],
                       axis_expr=tuple((a, e.subst(loop.name, repl)) for a, e in nest.axis_expr),
                       guards=guards)


@dataclass(frozen=True)
class Reorder(Step):
    order: tuple[str, ...]

    def apply(self, op, nest):
        check(len(set(self.order)) == len(self.order), self, "a loop is named twice")
        for name in self.order:
            self._loop(nest, name)
        slots = sorted(nest.index(n) for n in self.order)
        loops = list(nest.loops)
        for slot, name in zip(slots, self.order):
            loops[slot] = nest.loop(name)
        return replace(nest, loops=tuple(loops))


@dataclass(frozen=True)
class Tile(Step):
    outer: str
    inner: str
    outer_factor: int
    inner_factor: int

    def apply(self, op, nest):
        check(self.outer != self.inner, self, "outer and inner are the same loop")
        check(nest.index(self._loop(nest, self.outer).name) < nest.index(self._loop(nest, self.inner).name),
              self, f"{self.outer!r} is not outside {self.inner!r}")
        try:
            nest = Split(self.outer, self.outer_factor).apply(op, nest)
            nest = Split(self.inner, self.inner_factor).apply(op, nest)
        except ScheduleError as e:
            raise ScheduleError(f"{self}: {e}") from None
        o, i = self.outer, self.inner
        return Reorder((f"{o}_o", f"{i}_o", f"{o}_i", f"{i}_i")).apply(op, nest)


@dataclass(frozen=True)
class Fuse(Step):
    outer: str
    inner: str

    def apply(self, op, nest):
        a, b = self._unannotated(nest, self.outer), self._unannotated(nest, self.inner)
        check(nest.index(b.name) == nest.index(a.name) + 1, self,
              f"{b.name!r} is not directly inside {a.name!r}")
        check(a.reduce == b.reduce, self, "cannot fuse a spatial loop with a reduce loop")
        check(not {a.name, b.name} & nest.anchors(), self, "a fused loop may not anchor a cache stage")
        f = Loop(f"{a.name}_{b.name}", a.extent * b.extent, a.reduce, a.axis)
        check(not nest.has(f.name), self, f"a loop named {f.name!r} exists already")
        fv = Lin.var(f.name)

        def sub(e: Lin) -> Lin:
            return e.subst(a.name, fv.floordiv(b.extent)).subst(b.name, fv.mod(b.extent))

        i = nest.index(a.name)
        return replace(nest, loops=nest.loops[:i] + (f,) + nest.loops[i + 2:],
                       axis_expr=tuple((ax, sub(e)) for ax, e in nest.axis_expr),
                       guards=tuple((sub(e), n) for e, n in nest.guards))


@dataclass(frozen=True)
class Vectorize(Step):
    loop: str

    def apply(self, op, nest):
        loop = self._loop(nest, self.loop)
        check(not loop.reduce, self, "only a spatial loop can be vectorized")
        return self._set_kind(nest, self.loop, "vectorize")


@dataclass(frozen=True)
class Unroll(Step):
    loop: str

    def apply(self, op, nest):
        loop = self._loop(nest, self.loop)
        check(loop.extent <= MAX_UNROLL, self, f"extent {loop.extent} exceeds the unroll limit {MAX_UNROLL}")
        return self._set_kind(nest, self.loop, "unroll")


@dataclass(frozen=True)
class Parallel(Step):
    loop: str

    def apply(self, op, nest):
        loop = self._loop(nest, self.loop)
        check(not loop.reduce, self, "a reduce loop cannot run in parallel (threads would race)")
        check(all(l.kind != "parallel" for l in nest.loops), self, "a loop is already parallel")
        return self._set_kind(nest, self.loop, "parallel")


THREAD_AXES = ("blockIdx.x", "blockIdx.y", "blockIdx.z", "threadIdx.x", "threadIdx.y", "threadIdx.z")
BIND = "bind:"


def bound_axis(loop: Loop) -> str | None:
    """The GPU axis ``loop`` is bound to (``"threadIdx.x"``...), or None."""
    return loop.kind[len(BIND):] if loop.kind.startswith(BIND) else None


@dataclass(frozen=True)
class Bind(Step):
    """Run a spatial loop's iterations as GPU blocks or threads.

    Recorded as the loop's kind (``bind:threadIdx.x``) rather than a separate field:
    a loop runs in exactly one way (serial, parallel, vectorized, unrolled or bound),
    so every existing rule about annotated loops (no split or fuse of one, unrolled
    loops hold only unrolled or vectorized loops) applies to bound loops unchanged.
    """

    loop: str
    thread_axis: str

    def apply(self, op, nest):
        loop = self._loop(nest, self.loop)
        check(self.thread_axis in THREAD_AXES, self, f"unknown thread axis {self.thread_axis!r} "
                                                     f"(known: {', '.join(THREAD_AXES)})")
        check(not loop.reduce, self, "a reduce loop cannot be bound (threads would race on the sum)")
        taken = [l.name for l in nest.loops if bound_axis(l) == self.thread_axis]
        check(not taken, self, f"{self.thread_axis} is already bound to {', '.join(taken)}")
        return self._set_kind(nest, self.loop, BIND + self.thread_axis)


@dataclass(frozen=True)
class CacheWrite(Step):
    loop: str

    def apply(self, op, nest):
        self._loop(nest, self.loop)
        check(nest.cache_write is None, self, "the output is already cached")
        return replace(nest, cache_write=self.loop)


@dataclass(frozen=True)
class CacheRead(Step):
    tensor: str
    loop: str

    def apply(self, op, nest):
        names = [op.lhs.tensor, op.rhs.tensor]
        check(self.tensor in names, self, f"{self.tensor!r} is not an operand of the product "
                                          f"(operands: {', '.join(names)})")
        self._loop(nest, self.loop)
        check(all(t != self.tensor for t, _ in nest.cache_reads), self, f"{self.tensor!r} is already cached")
        return replace(nest, cache_reads=nest.cache_reads + ((self.tensor, self.loop),))


MAX_BUFFERS = 4   # slices of one stage in flight: beyond, shared memory runs out first


@dataclass(frozen=True)
class DoubleBuffer(Step):
    """Two buffers for ``tensor``'s stage: the next slice is copied while this one is used;
    applied again, one buffer more (a pipeline of up to :data:`MAX_BUFFERS` slices), which
    hides a longer copy behind the compute at the cost of shared memory.

    The stage's loop must be serial and run at least twice; a tail is fine (the copies of
    a last, partial slice read zeros beyond the tensor). CUDA only (a rule of the target).
    """

    tensor: str

    def apply(self, op, nest):
        anchor = dict(nest.cache_reads).get(self.tensor)
        check(anchor is not None, self, f"{self.tensor!r} has no cache_read stage to double-buffer")
        check(nest.double_buffered.count(self.tensor) + 1 < MAX_BUFFERS, self,
              f"{self.tensor!r} has {MAX_BUFFERS} buffers already")
        loop = nest.loop(anchor)
        check(loop.kind == "serial" and loop.extent >= 2, self,
              f"its stage's loop {anchor!r} must be serial and run at least twice")
        return replace(nest, double_buffered=nest.double_buffered + (self.tensor,))


def tensor_axes(op: Operator) -> dict[str, str]:
    """The op axes each role of a tensor-core tile can take, comma-joined: ``m`` indexes
    the output and the left operand only, ``n`` the output and the right operand only,
    ``k`` is a reduction over both (a matmul: i, j, k; a convolution: its batch and
    pixels, its output channels, its input channels and window)."""
    out, lhs, rhs = op.out.axes, op.lhs.axes, op.rhs.axes
    roles = {"m": (out & lhs) - rhs, "n": (out & rhs) - lhs,
             "k": {a.name for a in op.axes if a.reduce} & lhs & rhs}
    return {r: ",".join(sorted(v)) for r, v in roles.items()}


def tensor_tile(op: Operator, nest: LoopNest) -> tuple[str, str, str] | None:
    """(m, n, k): the nest's three innermost loops as a tensor-core tile, where their
    extents and axes fit one (:class:`Tensorize` says why not); None otherwise."""
    mma_k = DTYPES[op.dtype].mma_k
    if not mma_k or nest.tensorized or len(nest.loops) < 3:
        return None
    roles = {r: v.split(",") for r, v in tensor_axes(op).items()}
    inner = nest.loops[-3:]
    pick = {}
    for role, extent in (("k", mma_k), ("m", MMA_M), ("n", MMA_N)):
        pick[role] = next((l.name for l in inner if l.axis in roles[role] and l.extent == extent
                           and l.reduce == (role == "k") and l.name not in pick.values()), None)
    if None in pick.values() or any(l.kind != "serial" for l in inner) or {l.name for l in inner} & nest.anchors():
        return None
    if any(pick["k"] in e.vars() for e, _ in nest.guards):
        return None
    return pick["m"], pick["n"], pick["k"]


@dataclass(frozen=True)
class Tensorize(Step):
    """The three innermost loops as one tensor-core tile (m16n8k16, or m16n8k8 for tf32 and
    fp32, the latter as three instructions: 3xTF32).

    Each named loop must be serial, untouched by tails where it reduces, and play its
    role: ``m`` an output row axis read by the left operand only, ``n`` an output column
    axis read by the right operand only, ``k`` a reduction over both. Target rules
    (CUDA only, warps per block) are checked in :func:`kernels.codegen.rules.check_for_target`.
    """

    m: str
    n: str
    k: str

    def apply(self, op, nest):
        mma_k = DTYPES[op.dtype].mma_k
        check(mma_k > 0, self, f"{op.dtype} has no tensor-core instruction")
        check(not nest.tensorized, self, "the nest is tensorized already")
        names = (self.m, self.n, self.k)
        check(len(set(names)) == 3, self, "a loop is named twice")
        loops = [self._unannotated(nest, name) for name in names]
        inner = {l.name for l in nest.loops[-3:]}
        check(set(names) == inner, self, f"the tile must be the three innermost loops "
                                         f"({', '.join(l.name for l in nest.loops[-3:])})")
        check(not set(names) & nest.anchors(), self, "a tensorized loop may not anchor a cache stage")
        roles = tensor_axes(op)
        for role, loop, extent in zip("mnk", loops, (MMA_M, MMA_N, mma_k)):
            check(loop.axis in roles[role].split(","), self,
                  f"loop {loop.name!r} (axis {loop.axis}) cannot be the tile's {role}: "
                  f"{role} takes {roles[role] or 'no axis of ' + op.kind}")
            check(loop.extent == extent, self, f"loop {loop.name!r} has extent {loop.extent}; "
                                               f"the {op.dtype} instruction's {role} is {extent}")
        for e, n in nest.guards:
            check(self.k not in e.vars(), self, f"the reduction has a tail through {self.k!r} "
                                                f"({e} < {n}); split it by a divisor")
        return replace(nest, tensorized=names)


WGMMA_ROW_BYTES = 128   # a stage row of either operand: one row of the 128-byte swizzle
WGMMA_M, WGMMA_MAX_N = 64, 256
WGMMA_DTYPES = ("tf32", "bf16", "fp16")


def b_k_major(dtype: str) -> bool:
    """Whether a warpgroup nest keeps B's stage transposed, k contiguous: wgmma reads a
    32-bit (tf32) B along k only, while B lies in memory along n."""
    return DTYPES[dtype].bytes == 4


@dataclass(frozen=True)
class WarpgroupTile:
    """Where a warpgroup's instruction lies in the nest (see :func:`warpgroup_tile`)."""

    anchor: str                 # the loop whose iteration holds one k slice of both stages
    n_loops: tuple[str, ...]    # spatial loops folded into the instruction (its 8-column tiles)
    n: int                      # the instruction's n
    warps: str                  # the threadIdx.y loop over m: four consecutive warps, 64 rows


def warpgroup_tile(op: Operator, nest: LoopNest, step: Step) -> WarpgroupTile:
    """The tensorized nest as ``wgmma.m64nNk*`` of warpgroups, or ScheduleError naming what
    does not fit. A warpgroup is four consecutive warps of a block: here four consecutive
    iterations of the threadIdx.y loop, each 16 rows further along m (so no loop is bound to
    threadIdx.x). Its instruction covers those 64 rows and every column of the warp's tile:
    the spatial loops between the k loops and the instruction run along n only. Both
    operands come from shared stages of one loop (the instruction reads shared memory
    through descriptors): A's stage in rows of 128 bytes along k. B's stage holds the same
    k rows along n: for 16-bit types in 64-column blocks that wgmma reads transposed, for
    tf32 (which wgmma reads along k only) transposed in shared memory, one row of 32
    elements along k per column (:func:`b_k_major`). Rows of A, and of B where it is
    copied in 16-byte chunks, start at 16-byte boundaries in memory for those copies."""
    check(op.dtype in WGMMA_DTYPES, step, f"wgmma takes {', '.join(WGMMA_DTYPES)}, not {op.dtype}")
    check(bool(nest.tensorized), step, "the nest is not tensorized: tensorize first")
    check(nest.cache_write is not None, step, "the nest has no cache_write: the accumulators' tile comes first")
    m, n, k = nest.tensorized
    lhs, rhs = op.lhs.tensor, op.rhs.tensor
    stages = dict(nest.cache_reads)
    anchor = stages.get(lhs)
    check(anchor is not None and stages.get(rhs) == anchor, step,
          f"{lhs!r} and {rhs!r} need shared stages (cache_read) at one loop: wgmma reads both from shared memory")
    elem = DTYPES[op.dtype].bytes
    for t in (lhs,) if b_k_major(op.dtype) else (lhs, rhs):
        check(op.tensor(t).shape[-1] * elem % 16 == 0, step,
              f"rows of {t!r} are {op.tensor(t).shape[-1]} elements: a multiple of {16 // elem} "
              f"keeps 16-byte copies aligned")
    threads = [l for l in nest.loops if (bound_axis(l) or "").startswith("threadIdx")]
    check(not any(bound_axis(l) == "threadIdx.x" for l in threads), step,
          "a loop is bound to threadIdx.x: a warpgroup is four consecutive warps along threadIdx.y")
    warps = next((l for l in threads if bound_axis(l) == "threadIdx.y"), None)
    check(warps is not None and warps.extent % 4 == 0, step,
          "bind a loop over m to threadIdx.y with a multiple of 4 iterations (four warps, one warpgroup)")
    inner = nest.inside(anchor)[:-3]
    n_loops = tuple(l for l in inner if not l.reduce)
    check(all(l.reduce for l in inner[:len(inner) - len(n_loops)]), step,
          f"spatial loops inside {anchor!r} must lie inside its k loops, around the instruction")
    check({l.name for l in tile_shape(nest)} - {m, n} == {l.name for l in n_loops}, step,
          f"the thread's tile has spatial loops outside {anchor!r}: one instruction covers the whole tile")
    check(all(l.kind == "unroll" for l in n_loops), step, "the loops folded into the instruction must be unrolled")
    a_dims = footprint(op, nest, lhs, anchor, also=tuple(threads))
    b_dims = footprint(op, nest, rhs, anchor, also=tuple(threads))
    check(a_dims is not None and b_dims is not None and len(a_dims) >= 2 and len(b_dims) >= 2, step,
          "a stage's footprint is not a box")
    rows, cols = a_dims[-2][1], a_dims[-1][1]
    check(cols.coef(k) == 1 and a_dims[-1][2] * elem == WGMMA_ROW_BYTES, step,
          f"{lhs!r}'s stage must hold rows of {WGMMA_ROW_BYTES // elem} elements along k, "
          f"not {a_dims[-1][2]} (split the k loop of the stage)")
    check(rows.coef(m) == 1 and rows.coef(warps.name) == 16 and all(
          c % WGMMA_M == 0 for v, c in rows.coefs()[0].items() if v not in (m, warps.name)), step,
          f"each warp of {warps.name!r} must take the next 16 rows of {lhs!r}'s stage (one row tile a warp)")
    ks, cols = b_dims[-2][1], b_dims[-1][1]
    check(ks.coef(k) == 1 and b_dims[-2][2] == a_dims[-1][2] and cols.coef(n) == 1, step,
          f"{rhs!r}'s stage must hold the same k rows as {lhs!r}'s, along n")
    stride = MMA_N
    for l in sorted(n_loops, key=lambda l: cols.coef(l.name) or 0):
        check(cols.coef(l.name) == stride, step, f"loop {l.name!r} must step to the next columns of the tile")
        stride *= l.extent
    check(stride <= WGMMA_MAX_N, step, f"the warp's tile is {stride} columns wide: wgmma takes at most {WGMMA_MAX_N}")
    block = 8 if b_k_major(op.dtype) else WGMMA_ROW_BYTES // elem   # 8 rows of 128 bytes: a swizzle atom
    check(b_dims[-1][2] % block == 0 and all(
          c % block == 0 for v, c in cols.coefs()[0].items()
          if v != n and v not in {l.name for l in n_loops}), step,
          f"{rhs!r}'s stage must be whole blocks of {block} columns, each warpgroup starting one")
    check(all(d[2] == 1 for d in a_dims[:-2] + b_dims[:-2]), step, "a stage holds more than one matrix")
    return WarpgroupTile(anchor, tuple(l.name for l in n_loops), stride, warps.name)


@dataclass(frozen=True)
class Warpgroup(Step):
    """The tensorized tile issued by warpgroups: one ``wgmma`` per k step covers four warps'
    16-row tiles and the whole width of their tile, reading both operands from shared
    memory (Hopper, sm_90; :func:`warpgroup_tile` gives the conditions). The last step of a
    schedule: nothing after it may change the loops it relies on."""

    def apply(self, op, nest):
        check(not nest.warpgroup, self, "the nest is issued by warpgroups already")
        warpgroup_tile(op, nest, self)
        return replace(nest, warpgroup=True)


def validate(op: Operator, nest: LoopNest, step: Step) -> None:
    """Invariants every nest must keep, whatever step produced it."""
    names = [l.name for l in nest.loops]
    check(len(set(names)) == len(names), step, "loop names collide")
    if nest.tensorized:
        check(set(nest.tensorized) == {l.name for l in nest.loops[-3:]}
              and all(l.kind == "serial" for l in nest.loops[-3:]), step,
              f"tensorized loops {', '.join(nest.tensorized)} must stay the three innermost, serial")
        check(not set(nest.tensorized) & nest.anchors(), step, "a tensorized loop may not anchor a cache stage")
    if nest.warpgroup:
        warpgroup_tile(op, nest, step)
    for tensor in set(nest.double_buffered):   # its stage's loop keeps running serially, twice or more
        anchor = nest.loop(dict(nest.cache_reads)[tensor])
        check(anchor.kind == "serial" and anchor.extent >= 2, step,
              f"loop {anchor.name!r} holds the double-buffered stage of {tensor!r}: it must stay serial")
    for i, loop in enumerate(nest.loops):
        if loop.kind == "vectorize":
            check(i == len(nest.loops) - 1, step, f"vectorized loop {loop.name!r} must stay innermost")
        if loop.kind == "parallel":  # one thread team per call, not one per outer iteration
            check(i == 0, step, f"parallel loop {loop.name!r} must be the outermost loop")
    for i, loop in enumerate(nest.loops):
        if loop.kind == "unroll":
            rolled = [l.name for l in nest.loops[i + 1:]   # a tensorized tile is one instruction
                      if l.kind not in ("unroll", "vectorize") and l.name not in nest.tensorized]
            check(not rolled, step, f"unrolled loop {loop.name!r} would contain the rolled loop(s) "
                                    f"{', '.join(rolled)}; unroll from the innermost loop outwards")
    bound = [(i, bound_axis(l)) for i, l in enumerate(nest.loops) if bound_axis(l)]
    if bound:
        last_block = max((i for i, a in bound if a.startswith("blockIdx")), default=-1)
        first_thread = min((i for i, a in bound if a.startswith("threadIdx")), default=len(nest.loops))
        if last_block > first_thread:
            check(False, step, f"blockIdx-bound loop {nest.loops[last_block].name!r} would lie "
                               f"inside threadIdx-bound loop {nest.loops[first_thread].name!r}")
    unrolled = math.prod(l.extent for l in nest.loops if l.kind == "unroll")
    check(unrolled <= MAX_UNROLLED_BODY, step,
          f"unrolled loops multiply to {unrolled} copies of the body (limit {MAX_UNROLLED_BODY})")
    if nest.cache_write:
        inner = nest.inside(nest.cache_write)
        outside = [l.name for l in nest.loops[:nest.index(nest.cache_write) + 1] if l.reduce]
        check(not outside, step, f"reduce loop(s) {', '.join(outside)} lie outside the cache_write "
                                 f"loop {nest.cache_write!r}; the tile would be written back unfinished")
        size = 4 * math.prod(l.extent for l in inner if not l.reduce)
        check(size <= MAX_LOCAL_BYTES, step, f"cache_write tile of {size} bytes exceeds {MAX_LOCAL_BYTES}")
    for tensor, anchor in nest.cache_reads:
        dims = footprint(op, nest, tensor, anchor)
        check(dims is not None, step, f"{tensor!r} is indexed through a fused loop inside {anchor!r}; "
                                      "its footprint is not a box")
        size = 4 * math.prod(d[2] for d in dims)
        check(size <= MAX_LOCAL_BYTES, step,
              f"cache_read buffer for {tensor!r} at {anchor!r} is {size} bytes (limit {MAX_LOCAL_BYTES})")


# ---------------------------------------------------------------- schedule

@dataclass(frozen=True)
class Schedule:
    """An operator plus the steps applied to it. Immutable: ``apply`` returns a new one."""

    op: Operator
    steps: tuple[Step, ...] = ()

    def __post_init__(self):
        object.__setattr__(self, "steps", tuple(self.steps))   # a list given is kept as a tuple

    @cached_property
    def nest(self) -> LoopNest:
        """Replayed from the longest prefix of the steps whose nest is remembered."""
        done, nest = len(self.steps), None
        while done and (nest := _NESTS.get(self.op, self.steps[:done])) is None:
            done -= 1
        nest = nest if done else initial_nest(self.op)
        for i in range(done, len(self.steps)):   # the longer prefixes are known to be missing
            nest = _apply(self.op, nest, self.steps[i])
            _NESTS.put(self.op, self.steps[:i + 1], nest)
        return nest

    def apply(self, step: Step) -> "Schedule":
        new = Schedule(self.op, self.steps + (step,))
        nest = _NESTS.get(self.op, new.steps)
        if nest is None:
            nest = _apply(self.op, self.nest, step)
            _NESTS.put(self.op, new.steps, nest)
        new.__dict__["nest"] = nest
        return new

    # convenience methods with TVM names
    def split(self, loop: str, factor: int) -> "Schedule":
        return self.apply(Split(loop, factor))

    def reorder(self, *order: str) -> "Schedule":
        return self.apply(Reorder(tuple(order)))

    def tile(self, outer: str, inner: str, outer_factor: int, inner_factor: int) -> "Schedule":
        return self.apply(Tile(outer, inner, outer_factor, inner_factor))

    def fuse(self, outer: str, inner: str) -> "Schedule":
        return self.apply(Fuse(outer, inner))

    def vectorize(self, loop: str) -> "Schedule":
        return self.apply(Vectorize(loop))

    def unroll(self, loop: str) -> "Schedule":
        return self.apply(Unroll(loop))

    def parallel(self, loop: str) -> "Schedule":
        return self.apply(Parallel(loop))

    def bind(self, loop: str, thread_axis: str) -> "Schedule":
        return self.apply(Bind(loop, thread_axis))

    def cache_write(self, loop: str) -> "Schedule":
        return self.apply(CacheWrite(loop))

    def cache_read(self, tensor: str, loop: str) -> "Schedule":
        return self.apply(CacheRead(tensor, loop))

    def tensorize(self, m: str, n: str, k: str) -> "Schedule":
        return self.apply(Tensorize(m, n, k))

    def double_buffer(self, tensor: str) -> "Schedule":
        return self.apply(DoubleBuffer(tensor))

    def warpgroup(self) -> "Schedule":
        return self.apply(Warpgroup())

    # serialisation: steps only
    def steps_json(self) -> list[dict]:
        return [s.to_json() for s in self.steps]

    def key(self) -> str:
        """Canonical string of the steps; identifies the schedule for a given op."""
        return json.dumps(self.steps_json(), sort_keys=True, separators=(",", ":"))

    def kernel_key(self) -> str:
        """Identifies the kernel the schedule lowers to (lowering reads the nest alone):
        step sequences that build the same loop nest, such as a reorder and its undoing,
        share it, and so do nests that differ only in loops of extent 1
        (``LoopNest.kernel_repr``). Searches measure a kernel once: a third of a tune's
        measurements went to kernels already measured under other steps, and then a
        fifth to a third of a GPU convolution's, half of a CPU 1x1 convolution's, to
        kernels that differed only in where their loops of extent 1 stood (their times
        within the noise). No steps: the target's default."""
        return self.nest.kernel_repr() if self.steps else "default"

    def simplified(self) -> "Schedule":
        """The same kernel in fewer steps, for reading: each run of consecutive reorders
        becomes one that names only the loops it leaves in other places, or none (a
        reorder and its undoing). Searches reach a kernel through such runs: the best
        depthwise_conv2d kernel of a tune held 15 reorders in a row, which one does."""
        steps, nest, before = [], initial_nest(self.op), None
        for step in self.steps + (None,):
            if isinstance(step, Reorder):
                before = before or nest
            elif before is not None:   # the end of a run of reorders
                moved = tuple(l.name for l, was in zip(nest.loops, before.loops) if l.name != was.name)
                if moved:
                    steps.append(Reorder(moved))
                before = None
            if step is not None:
                nest = _apply(self.op, nest, step)
                if not isinstance(step, Reorder):
                    steps.append(step)
        out = Schedule(self.op, tuple(steps))
        return out if out.kernel_key() == self.kernel_key() else self

    def to_json(self) -> dict:
        return {**self.op.to_json(), "steps": self.steps_json()}

    @staticmethod
    def from_json(d: dict, op: Operator | None = None) -> "Schedule":
        if not isinstance(d, dict) or not isinstance(d.get("steps", []), list):
            raise ScheduleError("a schedule must be a JSON object with a list of steps")
        if op is None:
            if "op" not in d or "shape" not in d:
                raise ScheduleError("a schedule without an operator needs 'op' and 'shape'")
            op = make_op(d["op"], d["shape"], d.get("dtype", "fp32"))
        sched = Schedule(op)
        for s in d.get("steps", []):
            sched = sched.apply(Step.from_json(s))
        return sched


class _NestCache:
    """The nests of recent step sequences: a search's children share their parents' first
    steps, and replaying them (each step validated) was most of a GPU search's proposing."""

    def __init__(self, size: int = 8192):
        self.size, self.nests = size, {}
        self.lock = threading.Lock()

    def get(self, op: Operator, steps: tuple[Step, ...]) -> LoopNest | None:
        try:
            hit = self.nests.get((id(op), steps))
        except TypeError:   # a step built by hand with a list in it: not remembered
            return None
        return hit[1] if hit is not None and hit[0] is op else None

    def put(self, op: Operator, steps: tuple[Step, ...], nest: LoopNest) -> None:
        with self.lock:   # the op is kept with its nest: its id is not reused while cached
            try:
                self.nests[(id(op), steps)] = (op, nest)
            except TypeError:
                return
            while len(self.nests) > self.size:
                del self.nests[next(iter(self.nests))]


_NESTS = _NestCache()


def _apply(op: Operator, nest: LoopNest, step: Step) -> LoopNest:
    if not isinstance(step, Step):
        raise ScheduleError(f"{step!r} is not a schedule step")
    new = step.apply(op, nest)
    validate(op, new, step)
    return new
