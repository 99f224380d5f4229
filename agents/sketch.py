"""Sketches: the structure of a good CPU schedule from an operator's axes alone (Ansor's
sketch generation), its parameters drawn at random.

Random rollouts of the environment's actions are a poor proposal distribution: almost
none of them holds a register tile, a packed panel and a parallel outer loop together,
so a search that starts from them spends its budget assembling structure instead of
tuning it. Every fast CPU kernel of a multiply-accumulate has the same shape, and it
can be derived from which axes are spatial, which reduce, and which tensor each
indexes (``kernels/ir/ops.py``), with no per-operator code:

- one spatial axis is vectorized, innermost, a multiple of the target's vector lanes
  wide; an axis qualifies where every input reads it with unit stride (an input that
  reads it in an outer dimension is packed, so the pack lays it out contiguously);
- a few other spatial axes form, with it, the register tile: the innermost loops,
  unrolled, under a ``cache_write`` anchored just outside the reduction loops;
- the reduction loops sit between the outer spatial tiles and the register tile
  (the largest one optionally split, its outer part a cache block);
- the outer spatial loops are fused from the outside until they give the cores
  enough iterations, and run ``parallel``;
- an input whose index skips an inner loop is optionally packed (``cache_read``) at an
  outer loop: a panel reused by every iteration of the loops it skips.

What is drawn: the vector axis and width, the register tile's axes and sizes, the
order of the outer loops, how many are fused, the reduction split, the pack anchors.
Each sketch is replayed and checked by the same rules as any candidate
(``agents.evolution.legal``); the evolutionary search's mutations then tune its factors.

On a GPU the structure is another (Ansor's multi-level tiling for GPUs), derived from the
same facts about the axes:

- every spatial axis in up to three levels: blocks (``blockIdx``), the threads of a block
  (``threadIdx``) and a thread's register tile; the output's innermost axis (contiguous
  in memory) takes ``threadIdx.x``, so neighbouring threads write neighbouring outputs;
- a thread's tile innermost, unrolled (its innermost loop along that axis vectorized),
  under a ``cache_write`` at the innermost thread loop;
- the largest reduction split into slices, each input staged in shared memory per slice
  (``cache_read`` at the slice loop; where the reduction is not split, once per block),
  optionally in a pipeline of two or three buffers (``double_buffer``);
- the block loops bound to ``blockIdx`` (the largest three; any others run serially in
  the block).

What is drawn: the register tile (which axes, how large), the threads (how many, along
which axes), the slice, which inputs are staged, the pipeline depth, how much of the
reduction is unrolled. In a dtype with tensor cores most sketches tensorize instead (in
fp32, whose tensor-core kernels win on large grids only, a quarter of them): the
instruction's m, n and k taken from axes that play those roles (``tensor_axes``: an
output axis only the left operand reads, one only the right operand reads, a reduction
over both), a warp's tiles of instructions and the block's warps along m and n, k slices
staged; ``mma.sync`` only (``warpgroup`` stays with the policies and the experts).
"""

from __future__ import annotations

import numpy as np

from kernels.ir.ops import Operator
from kernels.codegen.rules import check_for_target
from kernels.experts import split_loop
from kernels.ir.dtypes import DTYPES
from kernels.ir.schedule import MAX_UNROLL, MAX_UNROLLED_BODY, MMA_M, MMA_N, Schedule, ScheduleError, tensor_axes
from kernels.target import Target

from .evolution import legal

UNEVEN = 0.1                             # sketches fuse on while the cores idle more than this share
REDUCE_BLOCKS = (16, 32, 64, 128, 256)   # the outer part of a split reduction: a cache block
GPU_THREADS = (64, 128, 256)             # threads of a block
GPU_ROW_THREADS = (8, 16, 32)            # of them along the output's innermost axis
GPU_ACCUMULATORS = (4, 8, 16, 32, 64)    # a thread's register tile, in outputs
GPU_TILE_SIZES = (2, 3, 4, 6, 7, 8)      # the tile along one axis
GPU_SLICES = (4, 8, 16, 32, 64)          # a reduction slice staged in shared memory
TENSOR_SHARE = 0.75                      # of GPU sketches in a dtype with tensor cores: tensorized
SPLIT_TENSOR_SHARE = 0.25                # in fp32, whose tensor-core tiles (3xTF32) win on large grids only


def vector_axes(op: Operator, lanes: int) -> dict[str, tuple[float, tuple[str, ...]]]:
    """Spatial axes that can be vectorized: ``axis -> (weight, inputs to pack)``.

    An axis qualifies when every input reads it with coefficient 0 or 1 (a stride along
    the vector would gather); inputs that read it in an outer dimension must be packed
    to read it contiguously. Axes at least a vector long weigh more, and more again where
    the output's last dimension is the axis (its write-back is then contiguous too)."""
    found = {}
    for axis in (a for a in op.axes if not a.reduce and a.extent > 1):
        packs, ok = [], True
        for access in (op.lhs, op.rhs):
            coefs = [dict(aff.terms).get(axis.name, 0) for aff in access.index]
            if any(c not in (0, 1) for c in coefs):
                ok = False
            elif any(coefs[:-1]):
                packs.append(access.tensor)
        if not ok:
            continue
        weight = 1.0 if axis.extent >= lanes else 0.1
        if dict(op.out.index[-1].terms).get(axis.name):
            weight *= 2
        found[axis.name] = (weight, tuple(packs))
    return found


def _choice(rng: np.random.Generator, options, weights=None):
    if weights is not None:
        p = np.asarray(weights, float)
        return options[int(rng.choice(len(options), p=p / p.sum()))]
    return options[int(rng.integers(len(options)))]


def _tile_factor(extent: int, most: int, rng: np.random.Generator) -> int:
    """A register-tile size for an axis of ``extent``, at most ``most``: a divisor half the
    time (no tail), any size otherwise."""
    most = min(extent, most)
    if most <= 1:
        return 1
    divisors = [d for d in range(2, most + 1) if extent % d == 0]
    if divisors and rng.random() < 0.5:
        return _choice(rng, divisors)
    return int(rng.integers(2, most + 1))


def sketch(op: Operator, target: Target, rng: np.random.Generator) -> Schedule | None:
    """One random sketch of ``op`` (see the module doc) as a legal schedule; None where
    the operator has no axis to vectorize (a CPU) or to spread over threads (a GPU), or
    the drawn sketch breaks a rule."""
    draws = [_sketch] if target.kind != "cuda" else [_gpu_sketch]
    share = SPLIT_TENSOR_SHARE if DTYPES[op.dtype].split else TENSOR_SHARE
    if target.kind == "cuda" and DTYPES[op.dtype].mma_k and rng.random() < share:
        draws.insert(0, _tensor_sketch)          # where no instruction's tile fits: on the CUDA cores
    for draw in draws:
        try:
            s = draw(op, target, rng)
        except ScheduleError:
            continue
        if s is not None:
            return legal(op, s.steps, target)
    return None


def _sketch(op: Operator, target: Target, rng: np.random.Generator) -> Schedule | None:
    lanes, ext = target.vector_lanes, op.extents
    spatial = [a.name for a in op.axes if not a.reduce]
    reduce = [a.name for a in op.axes if a.reduce]
    candidates = vector_axes(op, lanes)
    if not candidates:
        return None
    names = list(candidates)
    vec = _choice(rng, names, [candidates[n][0] for n in names])
    strided = candidates[vec][1]
    panels = [acc for acc in (op.lhs, op.rhs) if vec in acc.axes]   # read with vectors: packed panels

    # the register tile: vectors along the vector axis times a few rows of other spatial axes
    accumulators = 24 if lanes >= 16 else 12      # of 32 (AVX-512) or 16 vector registers
    widths = [m * lanes for m in (1, 2, 3, 4) if m * lanes <= ext[vec]] or [ext[vec]]
    width = _choice(rng, widths, [4, 4, 1, 1][:len(widths)])
    budget = max(1, int(rng.integers(accumulators // 3, accumulators + 1)) // max(1, width // lanes))
    tile = {vec: width}
    others = [str(a) for a in rng.permutation([a for a in spatial if a != vec and ext[a] > 1])]
    for a in others[:int(rng.integers(1, 3))]:
        f = _tile_factor(ext[a], budget, rng)
        if f > 1:
            tile[a], budget = f, budget // f

    s = Schedule(op)
    outer, inner = [], []        # spatial loops outside the reduction, and the register tile's
    for a in spatial:
        f = tile.get(a, 1)
        if f == 1:
            outer.append(a)
        elif f >= ext[a]:
            inner.append(a)                     # the whole axis in the tile
        else:
            s = s.split(a, f)
            outer.append(f"{a}_o")
            inner.append(f"{a}_i")
    vec_loop = next(l for l in inner if l in (vec, f"{vec}_i"))
    inner = [str(l) for l in rng.permutation([l for l in inner if l != vec_loop])] + [vec_loop]
    extent = s.nest.extents
    # the outer loops: trivial ones first; then, half the time, those a panel's input reads
    # before those it skips (a pack outside these is reused by them), else the op's order or
    # a shuffled one
    trivial = [l for l in outer if extent[l] == 1]
    rest = [l for l in outer if l not in trivial]
    draw = rng.random()
    if draw < 0.5 and panels:
        reads = _choice(rng, panels).axes
        rest.sort(key=lambda l: s.nest.loop(l).axis not in reads)
    elif draw < 0.75:
        rest = [str(l) for l in rng.permutation(rest)]
    outer = trivial + rest

    reduce_outer, reduce_inner = [], list(reduce)
    big = max(reduce, key=lambda a: ext[a], default=None)
    blocks = [b for b in REDUCE_BLOCKS if big is not None and b < ext[big]]
    if blocks and rng.random() < 0.5:
        s = s.split(big, _choice(rng, blocks))
        reduce_outer, reduce_inner = [f"{big}_o"], [f"{big}_i" if a == big else a for a in reduce]
    s = s.reorder(*outer, *reduce_outer, *reduce_inner, *inner)
    extent = s.nest.extents

    # fuse the outer loops from the outside until the cores get enough iterations, evenly
    # (3 on 2 cores leave one idle a third of the time); parallel
    if outer:
        enough = target.cores * _choice(rng, [1, 4, 16])
        fused, size = outer[0], extent[outer[0]]
        rest = outer[1:]
        while rest and (size < enough or -size % target.cores > UNEVEN * size):
            s = s.fuse(fused, rest[0])
            fused, size = f"{fused}_{rest[0]}", size * extent[rest[0]]
            rest = rest[1:]
        outer = [fused, *rest]
        if size > 1 and target.cores > 1:
            s = s.parallel(fused)
        s = s.cache_write(outer[-1])
    s = s.vectorize(vec_loop)
    body = 1
    for loop in reversed(inner[:-1]):          # from the inside out: a register tile
        if extent[loop] > MAX_UNROLL or body * extent[loop] > MAX_UNROLLED_BODY:
            break
        s, body = s.unroll(loop), body * extent[loop]

    # packs: an input at an outer loop that holds, inside, an outer loop its index skips (the
    # panel is reused across that loop's iterations), or at a reduction block (contiguous
    # reads); mostly an input read with vectors; always one read along the vector axis in an
    # outer dimension (only packed are its vectors contiguous: read in place every vector is
    # a gather, 5-13 GFLOPS on this project's CPU where packed ran 130-190, and a cost model
    # that never saw the operator ranks the gathers first, as they copy nothing; no sketch
    # where no pack of it fits); nearly always one whose reads can fall in padding (a pack
    # writes the zeros once; read in place, every load is guarded)
    for access in (op.lhs, op.rhs):
        gathered = access.tensor in strided
        must = gathered or op.needs_bounds_check(access)
        if not gathered and rng.random() >= (0.9 if must else 0.8 if access in panels else 0.4):
            continue
        reads = frozenset().union(*(e.vars() for e in s.nest.access_exprs(access)))
        reuse = [a for i, a in enumerate(outer) if any(l not in reads for l in outer[i + 1:])]
        for anchors in (reuse, reduce_outer, outer if must else []):   # the first kind where it fits
            s, packed = _pack(s, access.tensor, anchors, rng)
            if packed:
                break
        else:
            if gathered:
                return None
    return s


def _pack(s: Schedule, tensor: str, anchors: list[str], rng: np.random.Generator) -> tuple[Schedule, bool]:
    """``s`` with ``tensor`` packed at one of ``anchors`` where its buffer fits, and whether
    it was: mostly the outermost (the most reuse), else a random one (the next ones inward
    tried in turn)."""
    if anchors:
        for anchor in anchors[0 if rng.random() < 0.7 else int(rng.integers(len(anchors))):]:
            try:
                return s.cache_read(tensor, anchor), True
            except ScheduleError:
                continue
    return s, False


def sketches(op: Operator, target: Target, rng: np.random.Generator, n: int,
             tries: int | None = None) -> list[Schedule]:
    """Up to ``n`` distinct legal sketches of ``op`` (fewer when ``tries`` draws, default
    ``10 * n``, do not find them)."""
    found: dict[str, Schedule] = {}
    for _ in range(tries if tries is not None else 10 * n):
        if len(found) >= n:
            break
        s = sketch(op, target, rng)
        if s is not None:
            found.setdefault(s.kernel_key(), s)
    return list(found.values())


def _output_axis(op: Operator) -> str | None:
    """The axis of the output's innermost dimension (its outputs are contiguous)."""
    terms = dict(op.out.index[-1].terms)
    return next(iter(terms), None)


def _gpu_sketch(op: Operator, target: Target, rng: np.random.Generator) -> Schedule | None:
    ext = op.extents
    live = [a.name for a in op.axes if not a.reduce and a.extent > 1]
    if not live:
        return None
    inner = _output_axis(op)
    inner = inner if inner in live else live[-1]
    # a thread's register tile: the innermost axis and up to two others, within a budget
    budget = int(_choice(rng, GPU_ACCUMULATORS))
    tile: dict[str, int] = {}
    others = [str(a) for a in rng.permutation([a for a in live if a != inner])]
    for a in [inner] + others[:int(rng.integers(0, 3))]:
        sizes = [f for f in GPU_TILE_SIZES if f <= min(ext[a], budget)]
        if sizes:
            fits = [f for f in sizes if ext[a] % f == 0]
            f = int(_choice(rng, fits if fits and rng.random() < 0.7 else sizes))
            tile[a], budget = f, budget // f
    # the threads of a block: along the innermost axis first, then one or two others
    threads: dict[str, int] = {}
    left = int(_choice(rng, GPU_THREADS))
    for a in [inner] + [str(a) for a in rng.permutation([a for a in live if a != inner])][:2]:
        room = -(-ext[a] // tile.get(a, 1))
        options = [t for t in ((*GPU_ROW_THREADS,) if a == inner else (2, 4, 8, 16, 32)) if t <= min(room, left)]
        if options:
            threads[a] = int(_choice(rng, options))
            left //= threads[a]
    reduce = [a.name for a in op.axes if a.reduce]
    big = max(reduce, key=lambda a: ext[a], default=None)
    slices = [f for f in GPU_SLICES if big is not None and 2 * f <= ext[big]]
    slice_ = int(_choice(rng, slices)) if slices else None
    stages = tuple(t for t in (op.lhs.tensor, op.rhs.tensor) if rng.random() < 0.85)
    buffers = int(_choice(rng, [1, 2, 3], [2, 2, 1]))
    return gpu_tiling(op, target, tile, threads, slice_, stages, buffers, int(rng.integers(0, len(reduce) + 2)))


def gpu_tiling(op: Operator, target: Target, tile: dict[str, int], threads: dict[str, int],
               slice_: int | None, stages: tuple[str, ...], buffers: int = 1,
               unroll_reduce: int = 1) -> Schedule | None:
    """The GPU sketch with these parameters: ``tile`` and ``threads`` map spatial axes to
    a thread's outputs and a block's threads along them (absent: 1); ``slice_`` splits
    the largest reduction (None: whole); ``stages`` are the inputs staged in shared memory,
    in ``buffers`` buffers where the slice loop and shared memory allow (else fewer, or
    none staged); ``unroll_reduce``: how many of the reduction loops inside the slice to
    unroll, from the innermost (as far as the unroll limits allow). None where no axis has
    threads. Split inside out (register tile, then threads), as the experts do."""
    ext = op.extents
    s = Schedule(op)
    block, thread, regs = [], [], []          # each axis's loop at each level
    for a in (a.name for a in op.axes if not a.reduce):
        r, t = min(tile.get(a, 1), ext[a]), threads.get(a, 1)
        outer = a
        if r > 1 and r < ext[a]:
            s, outer = s.split(a, r), f"{a}_o"
            regs.append(f"{a}_i")
        elif r > 1:
            regs.append(a)
            continue
        t = min(t, s.nest.loop(outer).extent)
        if t > 1 and t < s.nest.loop(outer).extent:
            s = s.split(outer, t)
            block.append(f"{outer}_o")
            thread.append(f"{outer}_i")
        elif t > 1:
            thread.append(outer)
        else:
            block.append(outer)
    inner = _output_axis(op)
    thread.sort(key=lambda l: s.nest.loop(l).axis == inner)     # threadIdx.x's loop last
    regs.sort(key=lambda l: s.nest.loop(l).axis == inner)       # the vectorized loop innermost
    reduce = [a.name for a in op.axes if a.reduce]
    big = max(reduce, key=lambda a: ext[a], default=None)
    slice_loop = None
    if slice_ is not None and big is not None and 1 < slice_ < ext[big]:
        s, slice_loop = s.split(big, slice_), f"{big}_o"
        reduce = [slice_loop] + [f"{big}_i" if a == big else a for a in reduce]
    if not thread:
        return None
    # the three largest block loops are the grid, blockIdx.x the innermost axis's (as
    # threadIdx.x) unless another's extent needs x's higher limit
    grid = sorted((l for l in block if s.nest.loop(l).extent > 1), key=lambda l: -s.nest.loop(l).extent)[:3]
    grid = [l for l in block if l in grid]
    serial = [l for l in block if l not in grid]
    s = s.reorder(*grid, *serial, *thread, *reduce, *regs)
    ranked = sorted(reversed(grid), key=lambda l: s.nest.loop(l).extent <= target.max_grid[1])
    for loop, axis in zip(ranked, ("blockIdx.x", "blockIdx.y", "blockIdx.z")):
        s = s.bind(loop, axis)
    for loop, axis in zip(reversed(thread), ("threadIdx.x", "threadIdx.y", "threadIdx.z")):
        s = s.bind(loop, axis)
    s = s.cache_write(thread[-1])
    body = 1                                     # copies of the body unrolled (vectors are not)
    for i, loop in enumerate(reversed(regs)):    # the register tile, from the inside out
        extent = s.nest.loop(loop).extent
        if i == 0 and s.nest.loop(loop).axis == inner:
            s = s.vectorize(loop)
            continue
        if extent > MAX_UNROLL or body * extent > MAX_UNROLLED_BODY:
            break
        s, body = s.unroll(loop), body * extent
    else:
        for loop in list(reversed([l for l in reduce if l != slice_loop]))[:unroll_reduce]:
            extent = s.nest.loop(loop).extent
            if extent > MAX_UNROLL or body * extent > MAX_UNROLLED_BODY:
                break
            s, body = s.unroll(loop), body * extent
    return _staged(s, stages, slice_loop or thread[-1], buffers, target)


def _staged(s: Schedule, tensors, anchor: str, buffers: int, target: Target) -> Schedule:
    """``s`` with each of ``tensors`` staged at ``anchor`` where shared memory holds it,
    the stages in a pipeline of up to ``buffers`` where the slices and memory allow."""
    for tensor in tensors:
        try:
            staged = s.cache_read(tensor, anchor)
            check_for_target(staged, target)
            s = staged
        except ScheduleError:
            continue
    staged_tensors = [t for t, _ in s.nest.cache_reads]
    for _ in range(buffers - 1):
        try:
            piped = s
            for tensor in staged_tensors:
                piped = piped.double_buffer(tensor)
            check_for_target(piped, target)
            s = piped
        except ScheduleError:
            break
    return s


def _tensor_sketch(op: Operator, target: Target, rng: np.random.Generator) -> Schedule | None:
    """A tensorized GPU sketch: an output axis of the left operand as the instruction's m
    (16), one of the right operand as its n (8), a reduction over both as its k; per warp
    a few instructions' tiles along m and n, warps along both, the k steps cut into slices
    staged in shared memory; the other spatial loops fused into the grid's m axis."""
    ext, mk = op.extents, DTYPES[op.dtype].mma_k
    roles = {r: [a for a in v.split(",") if a] for r, v in tensor_axes(op).items()}
    ms = [a for a in roles["m"] if ext[a] >= MMA_M]
    ns = [a for a in roles["n"] if ext[a] >= MMA_N]
    ks = [a for a in roles["k"] if ext[a] % mk == 0]
    if not (ms and ns and ks):
        return None
    inner = _output_axis(op)
    m = inner if inner in ms and rng.random() < 0.7 else str(_choice(rng, ms))
    n, k = str(_choice(rng, ns)), str(_choice(rng, ks))
    fm, fn = int(_choice(rng, [1, 2, 4])), int(_choice(rng, [1, 2, 4, 8]))
    wy, wx = int(_choice(rng, [1, 2, 4])), int(_choice(rng, [1, 2, 4]))
    steps = int(_choice(rng, [1, 2, 4]))
    buffers = int(_choice(rng, [1, 2, 3, 4], [1, 2, 2, 2]))
    return tensor_tiling(op, target, (m, n, k), (fm, fn), (wy, wx), steps, buffers)


def tensor_tiling(op: Operator, target: Target, axes: tuple[str, str, str], tiles: tuple[int, int],
                  warps: tuple[int, int], steps: int, buffers: int) -> Schedule | None:
    """The tensorized sketch with these parameters: the (m, n, k) axes, a warp's
    instruction tiles along m and n, the warps of a block along them, the k steps of
    a slice, and the buffers of the slice's stages (fewer where memory or the slices
    do not allow). Built in the order the tensor-core experts are: the instruction's
    tile innermost and tensorized first."""
    mk = DTYPES[op.dtype].mma_k
    m, n, k = axes

    def split(s: Schedule, loop: str, f: int) -> tuple[Schedule, str, str | None]:
        return split_loop(s, loop, min(f, s.nest.loop(loop).extent))

    s = Schedule(op).split(m, MMA_M).split(n, MMA_N).split(k, mk)
    mma = (f"{m}_i", f"{n}_i", f"{k}_i")
    s = s.reorder(*(l.name for l in s.nest.loops if l.name not in mma), *mma).tensorize(*mma)
    s, m_rest, m_tiles = split(s, f"{m}_o", tiles[0])
    s, m_block, m_warps = split(s, m_rest, warps[0])
    s, n_rest, n_tiles = split(s, f"{n}_o", tiles[1])
    s, n_block, n_warps = split(s, n_rest, warps[1])
    s, slices, k_steps = split(s, f"{k}_o", steps)
    spatial = {m_block, n_block, m_warps, n_warps, m_tiles, n_tiles}
    others = [l.name for l in s.nest.loops if not l.reduce and l.name not in spatial and l.name not in mma]
    reduce = [l.name for l in s.nest.loops if l.reduce and l.name not in (slices, k_steps) and l.name not in mma]
    block = others + [m_block]
    order = [*block, n_block, *(x for x in (m_warps, n_warps) if x), slices, *reduce,
             *(x for x in (k_steps, m_tiles, n_tiles) if x)]
    s = s.reorder(*order, *mma)
    for i in range(1, len(block)):               # the grid's m axis: every other spatial loop fused in
        s = s.fuse("_".join(block[:i]), block[i])
    s = s.bind("_".join(block), "blockIdx.y").bind(n_block, "blockIdx.x")
    for loop, axis in ((m_warps, "threadIdx.y"), (n_warps, "threadIdx.x")):
        if loop:
            s = s.bind(loop, axis)
    s = s.cache_write(n_warps or m_warps or n_block)
    for loop in (n_tiles, m_tiles, k_steps):
        if loop:
            s = s.unroll(loop)
    return _staged(s, (op.lhs.tensor, op.rhs.tensor), slices, buffers, target)
