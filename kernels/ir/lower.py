"""Lowering: a schedule's loop nest -> one loop IR that every backend renders.

The IR is a small tree of statements (``For``, ``If``, ``Alloc``, ``Store``,
``Sync``) over value expressions (``Load``, ``Mul``, ``Add``, ``Relu``, ``Zero``).
Index expressions are :class:`Lin` over loop variables, flattened to one offset per
buffer (row-major). Guards of non-divisible splits become loop bounds
(``v < min(extent, ceil((n - rest) / c))``) where the guarded expression is linear
in the loop that binds it last, and ``If`` nodes otherwise.

``lower(schedule, gpu=True)`` reads the nest as one GPU thread's program (bound
loops become block and thread indices in the renderer) and differs in three ways:
a ``cache_read`` is a ``shared`` buffer holding what the whole block reads, filled
by all its threads together between ``Sync`` barriers; guards that involve a
threadIdx loop are dropped from the compute like those of the register tile (reads
clamped instead) and applied at the write-back, so every thread of a block runs the
same loops and reaches every barrier; the tile's fill and write-back are unrolled,
so it stays in registers.
"""

from __future__ import annotations

import dataclasses
import math
from dataclasses import dataclass, field, replace

from . import mma
from .dtypes import DTYPES
from .expr import Lin
from .ops import Access, Operator
from .schedule import (WARP, WGMMA_ROW_BYTES, Loop, LoopNest, Schedule, Warpgroup, WarpgroupTile, b_k_major, bound_axis,
                       compose, footprint, footprint_shape, tile_shape, warpgroup_tile)


# ---------------------------------------------------------------- IR nodes

@dataclass(frozen=True)
class Load:
    buffer: str
    index: Lin
    bounds: tuple[tuple[Lin, int], ...] = ()   # each (e, n): read zero unless 0 <= e < n
    clamps: tuple[tuple[Lin, int, int], ...] = ()  # each (e, n, stride): add min(e, n-1)*stride


@dataclass(frozen=True)
class Mul:
    a: object
    b: object


@dataclass(frozen=True)
class Add:
    a: object
    b: object


@dataclass(frozen=True)
class Relu:
    a: object


@dataclass(frozen=True)
class Zero:
    pass


@dataclass
class Store:
    buffer: str
    index: Lin
    value: object
    accumulate: bool = False   # += instead of =
    copy_async: bool = False   # a copy into shared memory that may complete later (cp.async)


@dataclass
class StorePair:
    """``buffer[index] = lo; buffer[index + 1] = hi`` for 16-bit outputs, ``index`` even: one
    32-bit store (a tensor-core accumulator layout gives each thread such pairs)."""
    buffer: str
    index: Lin
    lo: object
    hi: object


@dataclass
class For:
    var: str
    extent: int
    body: list = field(default_factory=list)
    kind: str = "serial"                                # serial | parallel | vectorize | unroll
    bounds: tuple[tuple[Lin, int], ...] = ()            # extra limits: var < ceil(e / c)
    starts: tuple[Lin, ...] = ()                        # first iteration: max(0, each e)


@dataclass
class If:
    conds: tuple[tuple[Lin, int], ...]                  # all of e < n
    body: list = field(default_factory=list)


@dataclass
class Alloc:
    buffer: str
    size: int
    scope: str = "local"        # local (stack / registers) | shared (a GPU block's shared memory)
    #                             | fragment (a tensor-core operand's 32-bit registers)


@dataclass
class Let:
    """``const int var = min(value, limit)``: the start of a tail tile shifted back inside."""
    var: str
    value: Lin
    limit: int


@dataclass(frozen=True)
class Sync:
    """A barrier for the threads of a GPU block (``__syncthreads()``)."""


@dataclass(frozen=True)
class Fragment:
    """One operand of a tensor-core instruction loaded into a thread's 32-bit registers
    ``buffer[index + r]``: register ``r`` holds the loads of ``regs[r]`` (two 16-bit
    elements, low half first, or one tf32), indexed through the lane variables
    ``LANE_GROUP`` and ``LANE_PLACE`` (:mod:`kernels.ir.mma` says which lane holds what)."""

    buffer: str
    index: Lin
    regs: tuple[tuple[Load, ...], ...]


@dataclass(frozen=True)
class Mma:
    """One tensor-core instruction of a warp: ``acc[base + 0..3] += A tile x B tile``, its
    operands the registers ``(buffer, index)`` that ``Fragment`` statements loaded (A's
    four, B's two)."""

    acc: str
    base: Lin
    a: tuple[str, Lin]
    b: tuple[str, Lin]
    dtype: str


@dataclass(frozen=True)
class Wgmma:
    """One ``wgmma`` of a warpgroup: ``acc[base + 0 .. n / 2)`` += the 64 x k tile of A at
    ``a`` times the k x n tile of B at ``b`` (k: the dtype's ``mma_k``; element offsets in
    their shared stages, laid out as :func:`lower` documents for warpgroup nests);
    ``b_block``: bytes from one 64-column block of B's stage to the next (16-bit types,
    whose B is read transposed; a tf32 B is K-major like A)."""

    acc: str
    base: Lin
    a: tuple[str, Lin]
    b: tuple[str, Lin]
    n: int
    b_block: int
    dtype: str


@dataclass(frozen=True)
class WgmmaFence:
    """Before a warpgroup's first ``wgmma`` of a slice: its accumulators are ready."""


@dataclass(frozen=True)
class WgmmaCommit:
    """Close the ``wgmma`` issued so far into one group."""


@dataclass(frozen=True)
class WgmmaWait:
    """Wait until at most ``pending`` groups of this warpgroup's ``wgmma`` are in flight;
    then the ``size`` accumulators of ``acc`` are final for whatever reads them next (the
    compiler may not move those reads above the wait)."""

    pending: int
    acc: str = ""
    size: int = 0


@dataclass(frozen=True)
class Commit:
    """Close the asynchronous copies issued so far into one group (possibly empty)."""


@dataclass(frozen=True)
class Wait:
    """Wait until at most ``pending`` groups of this thread's asynchronous copies are in
    flight (``cp.async.wait_group``): the older ones have landed."""

    pending: int


LANE = "tc_lane"         # a thread's lane in its warp (tensorized kernels)
LANE_GROUP = "tc_g"      # lane // 4
LANE_PLACE = "tc_t"      # lane % 4

@dataclass
class Function:
    name: str
    params: tuple                                        # op tensors, in argument order
    body: list
    local_buffers: dict[str, int] = field(default_factory=dict)
    shared_buffers: dict[str, int] = field(default_factory=dict)


# ---------------------------------------------------------------- helpers

def _flat(index: tuple[Lin, ...], shape: tuple[int, ...]) -> Lin:
    out = Lin()
    for e, n in zip(index, shape):
        out = out * n + e
    return out


def _place_guards(nest_loops, guards, bound_vars: set[str]):
    """Assign each guard to the loop that binds its last variable.

    Returns {loop name: (bounds, conds)} where bounds are linear limits on that
    loop and conds are ``If`` conditions checked at the top of its body.
    """
    order = {l.name: i for i, l in enumerate(nest_loops)}
    placed: dict[str, tuple[list, list]] = {l.name: ([], []) for l in nest_loops}
    for e, n in guards:
        vs = e.vars() - bound_vars
        if not vs:
            continue
        last = max(vs, key=order.__getitem__)
        c = e.coef(last)
        if c is not None and c > 0:
            rest = e.drop({last})
            placed[last][0].append((Lin.constant(n) - rest, c))
        else:
            placed[last][1].append((e, n))
    return placed


# ---------------------------------------------------------------- lowering

def stage_padding(op: Operator, nest: LoopNest, dims) -> int:
    """Elements after each row of a shared stage holding footprint ``dims``, against bank
    conflicts in a tensorized nest. Where a row runs along the instruction's k (and for
    16-bit types, whose B fragments are read transposed, everywhere) a warp reads 16 bytes
    of each of 8 consecutive rows at once: rows of an even number of 16-byte units put
    some of those reads into the same banks, an odd number none, so such rows get 16
    bytes more. A 32-bit (tf32) row along m or n is read an element at a time, lane
    (g, t) at row t, column g: rows of 8 or 24 words (mod 32) keep the 32 lanes apart."""
    if not nest.tensorized or nest.warpgroup:   # wgmma stages: swizzled, never padded
        return 0
    elem, row = DTYPES[op.dtype].bytes, dims[-1][2]
    if elem == 4 and dims[-1][1].coef(nest.tensorized[2]) == 0:
        return min((want - row) % 32 for want in (8, 24))
    return 16 // elem if row * elem % 32 == 0 else 0


def stage_footprint(op: Operator, nest: LoopNest, tensor: str, anchor: str):
    """The box a block's shared stage of ``tensor`` at ``anchor`` holds: the footprint of
    all its threads (None where that is no box), its last dimension widened at both ends
    to whole chunks of 16 bytes (else 8 or 4) where the tensor's rows allow. A window's halo (a
    convolution's input at ``x - 1 .. x + 16``) otherwise starts each row at any element,
    and the copy moves the stage an element at a time: those copies took two thirds of a
    3x3 layer's time on tensor cores."""
    dims = footprint(op, nest, tensor, anchor, also=thread_loops(nest))
    if not dims or nest.warpgroup:   # wgmma stages: rows along k, laid out for the instruction
        return dims
    base, inner, ext = dims[-1]
    elem, row = DTYPES[op.dtype].bytes, footprint_shape(op, tensor, dims)[-1]
    # 16 bytes; 16-bit elements else 8 (rows of 28) or 4 (a pair: rows of 14)
    chunk = next((c // elem for c in ((16, 8, 4) if elem == 2 else (16,)) if row % (c // elem) == 0
                  and all(k % (c // elem) == 0 for _, k in base.terms)), None)
    if chunk is None or ext < chunk:
        return dims
    shift = base.const % chunk
    return dims[:-1] + [(base - shift, inner + shift, -(-(ext + shift) // chunk) * chunk)]


def stage_elements(op: Operator, nest: LoopNest, dims) -> int:
    """Elements of the shared buffer holding footprint ``dims`` (padding included)."""
    return math.prod(d[2] for d in dims[:-1]) * (dims[-1][2] + stage_padding(op, nest, dims))


def stage_bytes(elements: int, dtype: str) -> int:
    """Bytes a shared buffer of ``elements`` takes in the block's shared memory: rounded up
    to 16, so that the next stage starts aligned for 16-byte copies and ``ldmatrix``."""
    return -(-elements * DTYPES[dtype].bytes // 16) * 16


def _runs_again(loops) -> bool:
    """Whether what lies inside ``loops`` runs more than once in a thread block (a serial
    loop among them has two iterations or more): a stage filled there is refilled, so no
    thread may refill it while another still reads it."""
    return math.prod(l.extent for l in loops if not bound_axis(l)) > 1


def thread_loops(nest: LoopNest) -> tuple[Loop, ...]:
    """The loops bound to threadIdx axes, in nest order."""
    return tuple(l for l in nest.loops if (bound_axis(l) or "").startswith("threadIdx"))


def lower(schedule: Schedule, name: str = "kernel", gpu: bool = False, shift_tails: bool = True) -> Function:
    """The schedule's loop IR. On a CPU, a register tile's tail is shifted back to end at
    the extent (:func:`_tail_shifts`) where it can be, else computed whole with clamped
    reads; ``shift_tails=False`` forces the latter."""
    op, nest = schedule.op, schedule.nest
    loops = nest.loops
    local: dict[str, int] = {}
    shared: dict[str, int] = {}
    threads = thread_loops(nest) if gpu else ()
    if gpu and not nest.cache_write:
        raise ValueError("GPU lowering needs cache_write: each thread accumulates its outputs privately")

    out_t = op.output
    out_idx = _flat(nest.access_exprs(op.out), out_t.shape)

    # Spatial tails inside the cache_write tile are not guarded in the compute: the
    # tile is computed whole (in registers) and only its valid part is written back.
    # Reads that the dropped guards no longer keep inside a tensor are clamped.
    guards, dropped, shifts = nest.guards, (), {}
    if nest.cache_write:
        tile = {l.name for l in tile_shape(nest)}
        private = tile | {l.name for l in threads}
        dropped = tuple(g for g in guards if g[0].vars() & private)
        guards = tuple(g for g in guards if g not in dropped)
        if not gpu and shift_tails:
            shifts = _tail_shifts(nest, dropped, tile)
            dropped = tuple(g for g in dropped if g not in shifts.values())
    unguarded = set().union(*(e.vars() for e, _ in dropped))

    # where each input is read from: the tensor itself, or a packed local buffer
    packs: dict[str, list] = {l.name: [] for l in loops}
    reads: dict[str, Load] = {}
    pre, post = [], []
    head_of: dict[str, list] = {l.name: [] for l in loops}   # at the end of a loop's head (prologues)
    pre_copies: list = []
    prologues: dict[str, list] = {}    # per anchor: the first slices of its double-buffered stages
    prefetches: dict[str, list] = {}   # per anchor: the next slices, copied while this one is used
    synced: set[str] = set()        # anchors whose shared stage is refilled: barrier at body end
    for access in (op.lhs, op.rhs):
        cached = dict(nest.cache_reads).get(access.tensor)
        if cached and gpu:
            buf = f"{access.tensor}_shared"
            dims = stage_footprint(op, nest, access.tensor, cached)
            if dims is None:
                raise ValueError(f"the block's footprint of {access.tensor!r} at {cached!r} is not a box")
            shape = footprint_shape(op, access.tensor, dims)
            shared[buf] = math.prod(d[2] for d in dims)
            reads[access.tensor] = Load(buf, _flat(tuple(d[1] for d in dims), tuple(d[2] for d in dims)))
            pre.append(Alloc(buf, shared[buf], "shared"))  # hoisted: one allocation per block
            elem = DTYPES[op.dtype].bytes
            pad = stage_padding(op, nest, dims)
            if pad:
                padded = tuple(d[2] for d in dims[:-1]) + (dims[-1][2] + pad,)
                shared[buf] = math.prod(padded)
                pre[-1] = Alloc(buf, shared[buf], "shared")
                reads[access.tensor] = Load(buf, _flat(tuple(d[1] for d in dims), padded))
            place, vector = None, 16 // elem
            patch = None
            if nest.warpgroup and access is op.rhs and b_k_major(op.dtype):   # transposed: element copies
                place, vector, patch = _k_major(dims[-2][2]), 1, K_MAJOR_PATCH
            elif nest.warpgroup and access is op.rhs:   # wgmma reads B in blocks of 128-byte rows
                place = _column_blocks(dims[-2][2], WGMMA_ROW_BYTES // elem)
            if place:
                reads[access.tensor] = Load(buf, place([d[1] for d in dims], 1))
            copy = _cooperative_copy(access.tensor, shape, buf, dims, nest, threads,
                                     lanes=WARP if nest.tensorized else 1, vector=vector, pad=pad, place=place,
                                     patch=patch)
            depth = nest.buffers(access.tensor)
            if depth > 1:   # slice s in buffer s % depth, copied ahead by all buffers but one
                size, extent = shared[buf], nest.loop(cached).extent
                shared[buf] = depth * size
                pre[-1] = Alloc(buf, depth * size, "shared")
                reads[access.tensor] = Load(buf, reads[access.tensor].index + Lin.var(cached).mod(depth) * size)
                ahead_by = depth - 1 - _wgmma_in_flight(nest, depth)
                slices = prologues.setdefault(cached, [[] for _ in range(ahead_by)])
                for s in range(min(ahead_by, extent)):
                    slices[s].append(_retarget(copy, cached, Lin.constant(s), Lin.constant(s * size)))
                ahead = Lin.var(cached) + ahead_by
                prefetches.setdefault(cached, []).append(
                    If(((ahead, extent),), [_retarget(copy, cached, ahead, ahead.mod(depth) * size)]))
            else:
                if nest.warpgroup:   # wgmma reads swizzled stages: filled by the (swizzling) cp.async
                    copy = _retarget(copy, cached, Lin.var(cached), Lin())
                    packs[cached] += [copy, Commit(), Wait(0), Sync()]
                else:
                    packs[cached] += [copy, Sync()]
                if _runs_again(nest.loops[:nest.index(cached) + 1]):
                    synced.add(cached)
        elif cached:
            buf = f"{access.tensor}_local"
            dims = footprint(op, nest, access.tensor, cached)
            shape = footprint_shape(op, access.tensor, dims)
            order = _pack_order(dims, nest)
            local[buf] = math.prod(d[2] for d in dims)
            reads[access.tensor] = Load(buf, _flat(tuple(dims[d][1] for d in order),
                                                   tuple(dims[d][2] for d in order)))
            packs[cached] += [Alloc(buf, local[buf]), *_pack(access.tensor, shape, buf, dims, nest, order)]
        else:
            reads[access.tensor] = _direct_read(op, access, nest, unguarded)

    # A pipeline of asynchronous copies, one group per slice: the first depth - 1 slices
    # before the stage's loop; at the top of each iteration, a wait for all groups but the
    # depth - 2 latest (this slice has arrived), a barrier (every thread's copies are
    # visible, and every thread is done with the previous slice), then the copy of the
    # slice depth - 1 ahead into the buffer that the previous slice leaves free.
    # Where an outer loop runs the pipeline again, a barrier ends each run: its prologue must
    # not overwrite the buffers of the last slices while another thread still reads them.
    for anchor, slices in prologues.items():
        at = nest.index(anchor)
        (head_of[loops[at - 1].name] if at else pre_copies).extend(
            x for copies in slices for x in copies + [Commit()])
        packs[anchor] += [Wait(len(slices) - 1), Sync(), *prefetches[anchor], Commit()]
        if _runs_again(nest.loops[:at]):
            synced.add(loops[at - 1].name)
    product = Mul(reads[op.lhs.tensor], reads[op.rhs.tensor])
    bias = None
    if op.bias:
        bias = Load(op.bias.tensor, _flat(nest.access_exprs(op.bias), op.tensor(op.bias.tensor).shape))

    head: dict[str, list] = {l.name: list(packs[l.name]) + head_of[l.name] for l in loops}
    pre += pre_copies
    tail: dict[str, list] = {l.name: [] for l in loops}
    if nest.warpgroup:
        wg = warpgroup_tile(op, nest, Warpgroup())
        compute, write_back, size = _warpgroup(op, nest, wg, reads, bias, out_idx)
        head[wg.anchor].append(WgmmaFence())
        tail[wg.anchor] += [WgmmaCommit(), WgmmaWait(_wgmma_in_flight(nest, nest.buffers(op.lhs.tensor)))]
        acc = f"{out_t.name}_local"
        local[acc] = size
        head[nest.cache_write][:0] = [Alloc(acc, size), _fill(acc, size, "unroll")]
        outside = tuple(g for g in dropped if not g[0].vars() & {l.name for l in tile_shape(nest)})
        tail[nest.cache_write] += [WgmmaWait(0, acc, size)] + ([If(outside, write_back)] if outside else write_back)
        loops = loops[:-3 - len(wg.n_loops)]   # the instruction covers the thread's n tiles too
    elif nest.tensorized:
        compute, write_back, size, (host, loads) = _tensorized(op, nest, reads, bias, out_idx)
        acc = f"{out_t.name}_local"
        local[acc] = size
        head[nest.cache_write][:0] = [Alloc(acc, size), _fill(acc, size, "unroll")]
        head[host] += loads
        slice_loop = _slice_loop(nest) if DTYPES[op.dtype].split else None
        if slice_loop:
            part = f"{out_t.name}_slice"
            local[part] = size
            head[slice_loop][:0] = [Alloc(part, size), _fill(part, size, "unroll")]
            z = Lin.var(f"{part}_z")
            tail[slice_loop][:0] = [For(f"{part}_z", size, [Store(acc, z, Load(part, z), accumulate=True)], "unroll")]
            compute = replace(compute, acc=part)
        outside = tuple(g for g in dropped if not g[0].vars() & {l.name for l in tile_shape(nest)})
        tail[nest.cache_write] += [If(outside, write_back)] if outside else write_back
        loops = loops[:-3]
    elif nest.cache_write:
        tile = tile_shape(nest)
        acc = f"{out_t.name}_local"
        local[acc] = math.prod(l.extent for l in tile)
        acc_idx = _flat(tuple(Lin.var(l.name) for l in tile), tuple(l.extent for l in tile))
        compute = Store(acc, acc_idx, product, accumulate=True)
        # on a GPU, unrolled: constant indices keep the tile in registers
        kinds = {l.name: "vectorize" if l.kind == "vectorize" else "unroll" for l in tile} if gpu else None
        head[nest.cache_write][:0] = [Alloc(acc, local[acc]), _fill(acc, local[acc], "unroll" if gpu else "serial")]
        value = Load(acc, acc_idx)
        write_back = _loops_over(
            tile, nest, Store(out_t.name, out_idx, Relu(Add(value, bias)) if bias else value),
            bound=_names_to(nest, nest.cache_write), kinds=kinds)
        tile_names = {l.name for l in tile}
        outside = tuple(g for g in dropped if not g[0].vars() & tile_names)  # threads past a tail
        tail[nest.cache_write].append(If(outside, [write_back]) if outside else write_back)
    else:
        compute = Store(out_t.name, out_idx, product, accumulate=True)
        pre.append(_fill(out_t.name, math.prod(out_t.shape)))
        if bias:
            post.append(_epilogue(op))

    for anchor in synced:  # no thread may refill the stage while another still reads it
        tail[anchor].append(Sync())
    body = _build(loops, guards, head, tail, compute)
    if shifts:
        try:
            body = [_shifted(s, shifts) for s in body]
        except ValueError:     # a shifted loop is indexed with another stride: no shifting
            return lower(schedule, name, gpu, shift_tails=False)
    return Function(name, op.tensors, pre + body + post, local, shared)


def _retarget(stmt, var: str, value: Lin, offset: Lin):
    """A copy of a stage's fill for iteration ``value`` of loop ``var``, written ``offset``
    further into the buffer, asynchronously (another buffer of a pipelined stage)."""
    if isinstance(stmt, For):
        return For(stmt.var, stmt.extent, [_retarget(s, var, value, offset) for s in stmt.body], stmt.kind,
                   tuple((e.subst(var, value), c) for e, c in stmt.bounds), tuple(e.subst(var, value) for e in stmt.starts))
    if isinstance(stmt, If):
        return If(tuple((e.subst(var, value), n) for e, n in stmt.conds),
                  [_retarget(s, var, value, offset) for s in stmt.body])
    return Store(stmt.buffer, stmt.index + offset, _at(stmt.value, {var: value}), stmt.accumulate, copy_async=True)


def _at(load: Load, subst: dict[str, Lin]) -> Load:
    """``load`` with loop variables replaced (index, bounds and clamps)."""
    def sub(e: Lin) -> Lin:
        for var, repl in subst.items():
            e = e.subst(var, repl)
        return e
    return Load(load.buffer, sub(load.index), tuple((sub(e), n) for e, n in load.bounds),
                tuple((sub(e), n, st) for e, n, st in load.clamps))


def _lane_expr(coef: tuple[int, int, int]) -> Lin:
    g, t, c = coef
    return Lin.var(LANE_GROUP, g) + Lin.var(LANE_PLACE, t) + c if g or t else Lin.constant(c)


def _tensorized(op: Operator, nest: LoopNest, reads: dict[str, Load], bias: Load | None, out_idx: Lin):
    """(the Mma statement, the write-back statements, the accumulator's size per thread,
    (the loop whose head loads the fragments, those statements)) of a tensorized nest: each
    thread of the warp holds 4 accumulators per 16 x 8 tile of its warp's tile, and writes
    back the elements the instruction's layout gives it."""
    m, n, k = nest.tensorized
    tile = tile_shape(nest)
    frags = tuple(l for l in tile if l.name not in (m, n))   # the warp's 16 x 8 tiles
    base = _flat(tuple(Lin.var(l.name) for l in frags), tuple(l.extent for l in frags)) * 4
    size = 4 * math.prod(l.extent for l in frags)
    a_regs, b_regs = mma.fragments(DTYPES[op.dtype].mma_k)

    def regs(load: Load, rows: str, cols: str, layout) -> tuple:
        return tuple(tuple(_at(load, {rows: _lane_expr(r), cols: _lane_expr(c)}) for r, c in reg)
                     for reg in layout)

    # Each operand's fragments are loaded once for all the instructions that share them:
    # those of the unrolled spatial loops directly around the instruction (the warp's tile
    # at one k step), into registers indexed by the loops the fragment depends on.
    inner = nest.loops[nest.index(nest.cache_write) + 1:-3]
    anchors = nest.anchors()
    at = len(inner)
    while at and inner[at - 1].kind == "unroll" and not inner[at - 1].reduce and inner[at - 1].name not in anchors:
        at -= 1
    region, host = inner[at:], (inner[at - 1] if at else nest.loops[nest.index(nest.cache_write)]).name
    loads, operands = [], []
    for name, fragment in (("tc_a", regs(reads[op.lhs.tensor], m, k, a_regs)),
                           ("tc_b", regs(reads[op.rhs.tensor], k, n, b_regs))):
        used = set().union(*(_load_vars(x) for reg in fragment for x in reg))
        over = tuple(l for l in region if l.name in used)
        index = _flat(tuple(Lin.var(l.name) for l in over), tuple(l.extent for l in over)) * len(fragment)
        extents = [l.extent for l in over]
        if len(fragment) == 2 and over and extents[-1] % 2 == 0:
            # two tiles of B side by side as one load of four registers (ldmatrix.x4)
            last = over[-1].name
            pair = [{last: Lin.var(last, 2) + h} for h in (0, 1)]
            extents[-1] //= 2
            fill: list = [Fragment(name, index.subst(last, pair[0][last]),
                                   tuple(tuple(_at(x, sub) for x in reg) for sub in pair for reg in fragment))]
        else:
            fill = [Fragment(name, index, fragment)]
        for l, extent in reversed(list(zip(over, extents))):
            fill = [For(l.name, extent, fill, "unroll")]
        loads += [Alloc(name, len(fragment) * math.prod(l.extent for l in over), "fragment"), *fill]
        operands.append((name, index))
    compute = Mma(f"{op.output.name}_local", base, operands[0], operands[1], op.dtype)
    return compute, _write_back(op, nest, frags, base, bias, out_idx), size, (host, loads)


def _slice_loop(nest: LoopNest) -> str | None:
    """The loop each iteration of which a split (3xTF32) nest sums into fresh accumulators:
    the innermost serial reduction loop around the instruction, whose body is bounded (an
    unrolled slice of k). The tensor core's adder truncates, an error that grows with the
    accumulator; summed slice by slice and added with fp32's rounding, the sum stays within
    fp32's tolerance. None where every reduction loop is unrolled: one slice."""
    inner = nest.loops[nest.index(nest.cache_write) + 1:-3]
    return next((l.name for l in reversed(inner) if l.reduce and l.kind == "serial"), None)


def _wgmma_in_flight(nest: LoopNest, depth: int) -> int:
    """Slices of ``wgmma`` a warpgroup nest leaves running while it issues the next: one
    where the pipeline has three buffers or more (its copies then run ``depth - 2`` slices
    ahead, into the buffer that the ``wgmma`` two slices back has finished reading)."""
    return int(nest.warpgroup and depth >= 3)


def _column_blocks(rows: int, block: int):
    """Where B's stage of a warpgroup nest puts element (k, column): blocks of ``block``
    columns (128 bytes) one after the other, each ``rows`` rows of ``block`` elements, as
    wgmma's transposed 128-byte-swizzled layout wants (the renderer swizzles the
    addresses). Takes the box's indices, the last one in ``width``-element chunks that
    never straddle a block, and the chunk's width."""
    def place(at: list, width: int) -> Lin:
        per = block // width
        return at[-1].floordiv(per) * (rows * block) + at[-2] * block + at[-1].mod(per) * width
    return place


# A warp's copy into a transposed stage: 4 k rows of 8 columns (32 contiguous bytes of
# each row of B); in the stage those are 8 rows of one 16-byte unit each, in 8 distinct
# units after the swizzle, so the 32 writes fall in 32 banks.
K_MAJOR_PATCH = (4, 8)


def _k_major(rows: int):
    """Where a transposed B stage of a warpgroup nest (:func:`b_k_major`) puts element
    (k, column) of its ``rows`` k rows: each column one row of ``rows`` elements along k,
    wgmma's K-major 128-byte-swizzled layout (the renderer swizzles the addresses). Takes
    the box's indices and the chunk's width (1: the copy moves single elements)."""
    def place(at: list, width: int) -> Lin:
        return at[-1] * rows + at[-2]
    return place


def _warpgroup(op: Operator, nest: LoopNest, wg: WarpgroupTile, reads: dict[str, Load], bias: Load | None,
               out_idx: Lin):
    """(the Wgmma statement, the write-back statements, the accumulator's size per thread)
    of a warpgroup nest laid out as ``wg``. A thread holds the same accumulators as in a
    warp's ``mma`` tiles (wgmma's layout, each warp its 16 rows); the instruction reads the
    stages from the warpgroup's first row and column."""
    m, n, k = nest.tensorized
    frags = tuple(l for l in tile_shape(nest) if l.name not in (m, n))
    base = _flat(tuple(Lin.var(l.name) for l in frags), tuple(l.extent for l in frags)) * 4
    size = 4 * math.prod(l.extent for l in frags)
    first = {v: Lin() for v in (m, n, k) + wg.n_loops}
    first[wg.warps] = Lin.var(wg.warps) - Lin.var(wg.warps).mod(4)
    a, b = (_at(reads[t], first) for t in (op.lhs.tensor, op.rhs.tensor))
    rows = footprint(op, nest, op.rhs.tensor, wg.anchor, also=thread_loops(nest))[-2][2]
    # the instruction covers every tile of the thread (frags are the folded loops): from 0
    compute = Wgmma(f"{op.output.name}_local", Lin(), (a.buffer, a.index), (b.buffer, b.index), wg.n,
                    WGMMA_ROW_BYTES * rows, op.dtype)
    return compute, _write_back(op, nest, frags, base, bias, out_idx), size


def _write_back(op: Operator, nest: LoopNest, frags, base: Lin, bias: Load | None, out_idx: Lin) -> list:
    """A tensorized nest's write-back: each thread stores the accumulators of its 16 x 8
    tiles (``frags``) where the instruction's layout puts them, under every guard on the
    tile's loops."""
    m, n, _ = nest.tensorized
    tile = tile_shape(nest)
    names = {l.name for l in tile}
    bound = {l.name for l in nest.loops[:nest.index(nest.cache_write) + 1]}
    guards = [(e, lim) for e, lim in nest.guards if e.vars() <= names | bound and e.vars() & names]
    stores = []
    for c, (row, col) in enumerate(mma.C):
        subst = {m: _lane_expr(row), n: _lane_expr(col)}

        def sub(e: Lin) -> Lin:
            return e.subst(m, subst[m]).subst(n, subst[n])
        value = Load(f"{op.output.name}_local", base + c)
        if bias is not None:
            value = Relu(Add(value, _at(bias, subst)))
        store = Store(op.output.name, sub(out_idx), value)
        conds = tuple((sub(e), lim) for e, lim in guards)
        if c % 2 and _pairs(stores[-1], store, conds, op):   # the element before, in the same word
            lo = stores.pop()
            lo = lo.body[0] if isinstance(lo, If) else lo
            store = StorePair(store.buffer, lo.index, lo.value, store.value)
        stores.append(If(conds, [store]) if conds else store)
    body: list = stores
    for l in reversed(frags):
        body = [For(l.name, l.extent, body, "unroll")]
    return body


def _pairs(prev, store: Store, conds, op: Operator) -> bool:
    """Whether ``store`` writes the 16-bit element after ``prev``'s, under the same guards,
    both in one aligned 32-bit word (the lower one at an even index whatever the loops)."""
    if DTYPES[op.dtype].bytes != 2:
        return False
    prev_conds = prev.conds if isinstance(prev, If) else ()
    lo = prev.body[0] if isinstance(prev, If) else prev
    e = lo.index
    return (isinstance(lo, Store) and prev_conds == conds and store.index == e + 1
            and e.const % 2 == 0 and all(c % 2 == 0 for _, c in e.terms))


def _load_vars(load: Load) -> set[str]:
    """Loop variables a load's index, bounds or clamps use."""
    return set().union(load.index.vars(), *(e.vars() for e, _ in load.bounds), *(e.vars() for e, *_ in load.clamps))


def _tail_shifts(nest: LoopNest, dropped, tile: set[str]) -> dict[str, tuple]:
    """Tail guards ``F*o + r < n`` of the register tile (``r`` over tile loops, below ``F``)
    whose tile can instead start at ``min(F*o, n - F)``: the last tile then overlaps the one
    before and ends at the extent, so neither its reads nor its write-back need a guard or
    a clamp, and its vector accesses stay contiguous. It recomputes a few outputs of the
    tile before, with the same sums, so it writes the same values; ``o`` must be a serial
    loop (no two threads write one element) in no other guard. Returns ``{o: guard}``."""
    kinds = {l.name: l.kind for l in nest.loops}
    ext = nest.extents
    out = {}
    for g in dropped:
        e, n = g
        outer = [(a, c) for a, c in e.terms if isinstance(a, str) and a not in tile]
        if len(outer) != 1 or e.coefs()[1] or e.const:
            continue
        (o, f), rest = outer[0], e.drop({outer[0][0]})
        lo, hi = rest.range(ext)
        if kinds.get(o) != "serial" or not (0 <= lo and hi < f <= n) or \
                sum(o in e2.vars() for e2, _ in nest.guards) != 1:
            continue
        out[o] = g
    return out


def _shifted(stmt, shifts: dict[str, tuple]):
    """``stmt`` with each shifted loop's body starting with its ``Let`` and reading it."""
    if isinstance(stmt, For) and stmt.var in shifts:
        (e, n) = shifts[stmt.var]
        f = e.coef(stmt.var)
        new = f"{stmt.var}_s"
        body = [Let(new, Lin.var(stmt.var, f), n - f)] + [_rescaled(s, stmt.var, f, new) for s in stmt.body]
        return replace(stmt, body=[_shifted(s, shifts) for s in body])
    if isinstance(stmt, (For, If)):
        return replace(stmt, body=[_shifted(s, shifts) for s in stmt.body])
    return stmt


def _rescaled(node, var: str, f: int, new: str):
    """``node`` (a statement, value or expression) with ``f * var`` read as ``new``."""
    if isinstance(node, Lin):
        return node.rescale(var, f, new)
    if isinstance(node, (list, tuple)):
        return type(node)(_rescaled(x, var, f, new) for x in node)
    if dataclasses.is_dataclass(node) and not isinstance(node, type):
        return replace(node, **{fl.name: _rescaled(getattr(node, fl.name), var, f, new)
                                for fl in dataclasses.fields(node)})
    return node


def _names_to(nest: LoopNest, anchor: str) -> set[str]:
    return {l.name for l in nest.loops[:nest.index(anchor) + 1]}


def _direct_read(op: Operator, access: Access, nest: LoopNest, unguarded: set[str]) -> Load:
    """A read of ``access`` from its tensor, safe for every iteration the loops make.

    A dimension that can leave the tensor inside the op's own domain (padding) reads
    zero there; one that leaves it only through unguarded tail iterations is clamped.
    """
    shape = op.tensor(access.tensor).shape
    exprs = nest.access_exprs(access)
    strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
    index, bounds, clamps = Lin(), [], []
    ext = nest.extents
    for aff, e, n, stride in zip(access.index, exprs, shape, strides):
        lo, hi = e.range(ext)
        in_domain = aff.range(op.extents)
        if 0 <= lo and hi < n:
            index = index + e * stride
        elif not (0 <= in_domain[0] and in_domain[1] < n):
            index = index + e * stride
            bounds.append((e, n))
        elif e.vars() & unguarded:
            clamps.append((e, n, stride))
        else:
            index = index + e * stride
    return Load(access.tensor, index, tuple(bounds), tuple(clamps))


def _fill(buffer: str, size: int, kind: str = "serial") -> For:
    return For(f"{buffer}_z", size, [Store(buffer, Lin.var(f"{buffer}_z"), Zero())], kind)


def _build(loops, guards, head, tail, innermost) -> list:
    placed = _place_guards(loops, guards, set())

    def rec(i: int) -> list:
        if i == len(loops):
            return [innermost]
        loop = loops[i]
        bounds, conds = placed[loop.name]
        stmts = head[loop.name] + rec(i + 1) + tail[loop.name]
        if conds:
            stmts = [If(tuple(conds), stmts)]
        return [For(loop.name, loop.extent, stmts, loop.kind, tuple(bounds))]

    return rec(0)


def _loops_over(loops, nest: LoopNest, stmt, bound: set[str], kinds: dict[str, str] | None = None) -> list:
    """Plain loops over ``loops`` (a subset of the nest's) around ``stmt``, with the guards
    that concern them; loop variables keep their names, so indices carry over. ``kinds``
    overrides a loop's kind (default serial)."""
    names = {l.name for l in loops}
    guards = [(e, n) for e, n in nest.guards if e.vars() <= names | bound and e.vars() & names]
    placed = _place_guards(loops, guards, bound)

    def rec(i: int) -> list:
        if i == len(loops):
            return [stmt]
        loop = loops[i]
        bounds, conds = placed[loop.name]
        stmts = rec(i + 1)
        if conds:
            stmts = [If(tuple(conds), stmts)]
        return [For(loop.name, loop.extent, stmts, (kinds or {}).get(loop.name, "serial"), tuple(bounds))]

    return rec(0)[0]


def _pack_order(dims, nest: LoopNest) -> list[int]:
    """The packed buffer's dimensions, outermost first: ordered by the innermost loop that
    indexes each (ties keep the tensor's order), so the loops inside the tile walk the
    buffer contiguously. For a weight read along a vectorised output-channel loop, that
    puts the channel last, transposing the tensor's layout in the pack."""
    position = {l.name: i for i, l in enumerate(nest.loops)}

    def innermost(d: int) -> int:
        return max((position[v] for v in dims[d][1].vars() if v in position), default=-1)
    return sorted(range(len(dims)), key=lambda d: (innermost(d), d))


def _copy_order(dims, order: list[int], run: int = 16) -> list[int]:
    """The pack's copy loops, outermost first: the buffer's order, so that writes walk it
    contiguously, except for the tensor's last dimensions while their box is at most
    ``run`` elements, which stay innermost in the tensor's order, so that reads come in
    short contiguous runs too. A weight pack that moves the output channel last (OIHW to
    ``[c][ry][rx][k]``) then copies a 3x3 window at a time for each channel: scattering
    each read row over the buffer instead cost a 512-channel layer at 7x7 as much as its
    arithmetic (L2 misses on the scattered stores)."""
    inner, size = [], 1
    for d in reversed(range(len(dims))):
        if size * dims[d][2] > run:
            break
        inner.insert(0, d)
        size *= dims[d][2]
    return [d for d in order if d not in inner] + inner


def _pack(tensor: str, shape, buf: str, dims, nest: LoopNest, order: list[int]) -> list:
    """Copy the footprint of ``tensor`` into ``buf`` (its dimensions in ``order``), zero
    outside the tensor.

    Where the box can leave the tensor (padding, a tail), each copy loop runs over the
    part inside the tensor only, so that no element is read under a condition: contiguous
    copies, and nothing for gcc to turn into masked loads (see ``CRenderer.value``). The
    rest is zeroed a face at a time (the slabs outside the tensor across each dimension)
    where that takes fewer stores than zeroing the whole buffer first.
    """
    vars_ = [f"{buf}_{d}" for d in range(len(dims))]
    ext = {**nest.extents, **{v: d[2] for v, d in zip(vars_, dims)}}
    src = tuple(base + Lin.var(v) for (base, _, _), v in zip(dims, vars_))
    stmt = Store(buf, _flat(tuple(Lin.var(vars_[d]) for d in order), tuple(dims[d][2] for d in order)),
                 Load(tensor, _flat(src, shape)))
    index = stmt.index
    faces = []   # the parts of the box outside the tensor, each a slab across one dimension
    for d in reversed(_copy_order(dims, order)):
        v, (base, _, size), e, n = vars_[d], dims[d], src[d], shape[d]
        lo, hi = e.range(ext)
        starts = (Lin() - base,) if lo < 0 else ()               # base + v >= 0
        bounds = ((Lin.constant(n) - base, 1),) if hi >= n else ()  # base + v < n
        if starts:
            faces.append((d, dict(bounds=((Lin() - base, 1),))))      # v < -base
        if bounds:
            faces.append((d, dict(starts=(Lin.constant(n) - base,))))  # v >= n - base
        stmt = For(v, size, [stmt], bounds=bounds, starts=starts)
    if not faces:
        return [stmt]
    total, row = math.prod(d[2] for d in dims), dims[order[-1]][2]
    # in elements, a store of a contiguous run counting as 16: a face across the buffer's
    # rows is a run of one or two elements in each row, which loses to zeroing it all
    across = sum(total // row for d, _ in faces if d == order[-1])
    if 16 * across + sum(total // dims[d][2] for d, _ in faces if d != order[-1]) >= total:
        return [_fill(buf, total), stmt]
    zeros = []
    for face, limits in faces:
        z = Store(buf, index, Zero())
        for d in reversed(order):
            z = For(vars_[d], dims[d][2], [z], **(limits if d == face else {}))
        zeros.append(z)
    return [*zeros, stmt]


def _merged(dims, shape):
    """The box and the tensor's shape with the box's trailing dimensions that span their
    whole tensor dimension folded into the one before: one contiguous run where the
    tensor has one (a weight's slice of channels with its whole 3 x 3 window), so a copy
    moves it in chunks of 16 bytes rather than by rows of 3 elements."""
    dims, shape = list(dims), list(shape)
    while len(dims) > 1 and dims[-1][2] == shape[-1] and dims[-1][0] == Lin():
        (base, inner, ext), (_, last, n) = dims[-2], dims[-1]
        dims[-2:] = [(base * n, inner * n + last, ext * n)]
        shape[-2:] = [shape[-2] * shape[-1]]
    return dims, tuple(shape)


def _cooperative_copy(tensor: str, shape, buf: str, dims, nest: LoopNest, threads: tuple[Loop, ...],
                      lanes: int = 1, vector: int = 4, pad: int = 0, place=None, patch: tuple[int, int] | None = None):
    """All threads of a block copy the footprint box of ``tensor`` into the shared ``buf``
    (zero outside the tensor): thread ``t`` takes chunks ``t, t + T, t + 2T, ...`` of
    ``width`` consecutive elements of the box (16 bytes: ``vector`` elements, where the
    box's rows allow), so neighbouring threads read neighbouring addresses (coalesced)
    and a renderer can move a chunk as one vector. ``lanes``: threads per thread loop
    iteration (a warp's lanes in a tensorized nest), numbered fastest. ``pad``: elements
    after each row of the buffer (the box's last dimension). ``place``: where a chunk goes
    instead, from the box's indices (the last in chunks) and the chunk's width. ``patch``
    (rows, columns), as many elements as ``lanes``: each warp takes single elements of
    such patches of the box's last two dimensions, row by row, warp ``w`` the patches
    ``w, w + W, ...`` along the rows: a transposed stage's writes then spread over the
    banks while each row's reads stay contiguous."""
    if not (pad or place or patch):
        dims, shape = _merged(dims, shape)
    exts = [d[2] for d in dims]
    size = math.prod(exts)
    widths = (vector, 4, 2) if vector == 8 else (vector, 4)   # 16-bit elements also move in pairs
    width = next((w for w in widths if exts[-1] % w == 0 and (w == 4 or shape[-1] % w == 0)), 1)
    nthreads = math.prod(l.extent for l in threads) * lanes
    tid, scale = (Lin.var(LANE), lanes) if lanes > 1 else (Lin(), 1)
    warp = Lin()   # tid // lanes
    for l in sorted(threads, key=lambda l: bound_axis(l)):  # threadIdx.x fastest, as CUDA numbers them
        tid, warp, scale = tid + Lin.var(l.name, scale), warp + Lin.var(l.name, scale // lanes), scale * l.extent
    chunks = size // width
    rounds = -(-chunks // nthreads)
    c, w = f"{buf}_c", f"{buf}_w"
    q = tid + Lin.var(c, nthreads) if rounds > 1 else tid       # this thread's chunk
    lane = Lin.var(w) if width > 1 else Lin()
    if patch:
        rows, cols = patch
        if rows * cols != lanes or exts[-2] % rows or exts[-1] % cols:
            raise ValueError(f"patches of {rows} x {cols} do not tile a warp's copy of the box {exts}")
        across, warps = exts[-1] // cols, nthreads // lanes   # patches along a row; warps
        if rounds == 1:
            band, col = warp.floordiv(across), warp.mod(across)
        elif across % warps == 0:   # a warp's patches: along the rows, then the next band
            band, col = Lin.var(c).floordiv(across // warps), warp + Lin.var(c).mod(across // warps) * warps
        elif warps % across == 0:   # whole bands per round
            band, col = warp.floordiv(across) + Lin.var(c, warps // across), warp.mod(across)
        else:
            at = warp + Lin.var(c, warps)
            band, col = at.floordiv(across), at.mod(across)
        chunk = [Lin()] * (len(dims) - 2) + [band * rows + Lin.var(LANE).floordiv(cols),
                                             col * cols + Lin.var(LANE).mod(cols)]
    else:
        chunk = []
        for d, ext in enumerate(exts):
            stride = math.prod(exts[d + 1:]) // width if d < len(dims) - 1 else 1
            x = q.floordiv(stride)
            x = x.mod(ext // width if d == len(dims) - 1 else ext) if d else x
            chunk.append(x if ext > 1 else Lin())
    src, at = [], []
    for d, ((base, _, ext), x) in enumerate(zip(dims, chunk)):
        at.append(x * width + lane if d == len(dims) - 1 else x)
        src.append(base + at[-1])
    ext_all = nest.extents
    bounds = []
    for (base, _, ext), e, n in zip(dims, src, shape):
        lo, hi = base.range(ext_all)
        if not (0 <= lo and hi + ext - 1 < n):
            bounds.append((e, n))
    if place:
        dst = place(chunk, width) + lane
    else:
        dst = _flat(tuple(at), tuple(exts[:-1]) + (exts[-1] + pad,)) if pad else q * width + lane
    stmt = Store(buf, dst, Load(tensor, _flat(tuple(src), shape), tuple(bounds)))
    if width > 1:
        stmt = For(w, width, [stmt], "vectorize")
    if chunks % nthreads:
        stmt = If(((q, chunks),), [stmt])
    return For(c, rounds, [stmt], "unroll" if patch else "serial") if rounds > 1 else stmt


def _epilogue(op: Operator) -> For:
    """out = max(out + bias, 0) over the whole output, for schedules without cache_write."""
    out_t = op.output
    vars_ = [f"e{d}" for d in range(len(out_t.shape))]
    axis_map = {}
    for access_e, v in zip(op.out.index, vars_):
        axis_map[access_e.terms[0][0]] = Lin.var(v)
    idx = _flat(tuple(Lin.var(v) for v in vars_), out_t.shape)
    bias = Load(op.bias.tensor, _flat(compose(op.bias, axis_map), op.tensor(op.bias.tensor).shape))
    stmt = Store(out_t.name, idx, Relu(Add(Load(out_t.name, idx), bias)))
    for v, n in reversed(list(zip(vars_, out_t.shape))):
        stmt = For(v, n, [stmt])
    return stmt
