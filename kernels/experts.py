"""Hand-written schedules: what a performance engineer would write, in the schedule IR.

They prove the search space holds fast code and give the agents a bar. Each
follows the same recipe: a register tile (an accumulator of ``rows x vector``
kept in registers by ``cache_write`` + ``unroll`` + ``vectorize``), the reduction
loops just outside it, an input panel packed contiguously (``cache_read``), and
the outermost spatial loop run in parallel. Tile sizes adapt to the shape and
the SIMD width; shapes that do not divide get guarded tails.
"""

from __future__ import annotations

from .ops import Operator
from .schedule import MAX_LOCAL_BYTES, Schedule
from .target import Target


def _pick(extent: int, preferred: tuple[int, ...]) -> int:
    """The first preferred factor dividing ``extent``; else the first that fits; else
    ``extent`` itself. (Factors stay among the environment's, so experts replay.)"""
    fits = [f for f in preferred if f <= extent] or [extent]
    return next((f for f in fits if extent % f == 0), fits[0])


def _vector_tile(extent: int, lanes: int) -> int:
    """Width of the vectorized loop: two registers if they divide the extent, else one."""
    return _pick(extent, (2 * lanes, lanes, lanes // 2, 2 * lanes))


def _matmul(op: Operator, target: Target, batch: bool) -> Schedule:
    ext = op.extents
    # Rows of the register tile: rows x 2 vector accumulators, 12 of AVX2's 16 registers
    # (16 of AVX-512's 32). A tail of rows costs little: the tile is computed whole.
    rows = min(ext["i"], 6 if target.vector_lanes <= 8 else 8)
    cols = _vector_tile(ext["j"], target.vector_lanes)
    s = Schedule(op).tile("i", "j", rows, cols)
    order = ("j_o", "i_o", "k", "i_i", "j_i")
    s = s.reorder(*(("b",) + order if batch else order))
    s = s.cache_write("i_o").vectorize("j_i").unroll("i_i")
    if batch:
        s = s.fuse("b", "j_o")
        outer = "b_j_o"
    else:
        outer = "j_o"
    s = s.parallel(outer)
    if 4 * ext["k"] * cols <= MAX_LOCAL_BYTES:
        s = s.cache_read("B", outer)  # a K x cols panel of B, contiguous rows
    return s


def _conv2d(op: Operator, target: Target) -> Schedule:
    ext = op.extents
    depthwise = op.kind == "depthwise_conv2d"
    channel = "c" if depthwise else "k"
    xs = _pick(ext["x"], (target.vector_lanes, target.vector_lanes // 2, target.vector_lanes))
    ys = _pick(ext["y"], (2, 4)) if not depthwise else _pick(ext["y"], (4, 2))
    s = Schedule(op).split("x", xs).split("y", ys)
    if depthwise:
        s = s.reorder("n", "c", "y_o", "x_o", "ry", "rx", "y_i", "x_i")
        s = s.cache_write("x_o").vectorize("x_i").unroll("y_i")
        s = s.fuse("n", "c").parallel("n_c")
        anchor = "n_c"
    else:
        ks = _pick(ext["k"], (4, 6, 3, 2))
        s = s.split("k", ks)
        s = s.reorder("n", "y_o", "k_o", "x_o", "c", "ry", "rx", "k_i", "y_i", "x_i")
        s = s.cache_write("x_o").vectorize("x_i").unroll("y_i").unroll("k_i")
        s = s.fuse("n", "y_o").parallel("n_y_o")
        anchor = "n_y_o"
    try:
        return s.cache_read("I", anchor)  # input rows with padding materialised
    except ValueError:
        return s  # footprint too large for a local buffer: read the input in place


def expert_schedule(op: Operator, target: Target) -> Schedule:
    """The hand-written schedule for ``op`` on ``target``."""
    if target.kind != "cpu":
        raise ValueError(f"no expert schedule for target {target.kind!r}")
    if op.kind in ("matmul", "dense_bias_relu"):
        return _matmul(op, target, batch=False)
    if op.kind == "batch_matmul":
        return _matmul(op, target, batch=True)
    if op.kind in ("conv2d", "depthwise_conv2d"):
        return _conv2d(op, target)
    raise ValueError(f"no expert schedule for {op.kind!r}")
