"""Hand-written schedules: what a performance engineer would write, in the schedule IR.

They prove the search space holds fast code and give the agents a bar. Each
follows the same recipe: a register tile (an accumulator of ``rows x vector``
kept in registers by ``cache_write`` + ``unroll`` + ``vectorize``), the reduction
loops just outside it, an input panel packed contiguously (``cache_read``), and
the outermost spatial loop run in parallel. Tile sizes adapt to the shape and
the SIMD width; shapes that do not divide get guarded tails.
"""

from __future__ import annotations

import functools
import math

from .codegen.rules import check_for_target
from .ir.dtypes import DTYPES
from .ir.ops import Operator
from .ir.schedule import FACTORS, MAX_LOCAL_BYTES, WGMMA_DTYPES, WGMMA_ROW_BYTES, Schedule, ScheduleError, b_k_major
from .target import Target


def _pick(extent: int, preferred: tuple[int, ...]) -> int:
    """The first preferred factor dividing ``extent``; else the first that fits; else
    ``extent`` itself. (Factors stay among the environment's, so experts replay.)"""
    fits = [f for f in preferred if f <= extent] or [extent]
    return next((f for f in fits if extent % f == 0), fits[0])


def _vector_tile(extent: int, lanes: int) -> int:
    """Width of the vectorized loop: two registers if they divide the extent, else one."""
    return _pick(extent, (2 * lanes, lanes, lanes // 2, 2 * lanes))


# Products of at most FEW_ROWS rows (a GEMV, a batch of two) take 4 vectors of columns, B
# read in place (once, tail or not): on this project's CPU (AVX-512) 1.11-2.01x the tile
# of 2 vectors (of half a vector where that divides the columns: 1000) on the 9 products
# of 1-2 rows the rule was chosen on, then 1.00-1.78x (geomean 1.27) on 13 others
# (matmul, dense_bias_relu, batch_matmul; chrt -f 1). At 4 rows: 0.75x and 1.22x.
FEW_ROWS = 2
# Where B takes at most SMALL_B_BYTES, the cores split the row tiles and read B in place,
# rather than split the column tiles and pack B's panels: on this project's CPU 1.01-1.74x
# on 7 products of 1.8-13 MFLOP the rule was chosen on (B of 33-131 KB), 0.99-1.05x on 7
# with B of 256 KB to 1 MB; then 1.00-1.79x (geomean 1.18) on 13 others (matmul,
# dense_bias_relu; chrt -f 1). The reason is not pinned down (each core reads A once).
# Batched products (B of one matrix): 1.02-1.11x on 7 chosen on, then 1.02-1.07x on 6 others.
SMALL_B_BYTES = 128 * 1024


def _matmul(op: Operator, target: Target, batch: bool) -> Schedule:
    ext = op.extents
    # Rows of the register tile: rows x 2 vector accumulators, 12 of AVX2's 16 registers
    # (16 of AVX-512's 32). A tail of rows costs little: the tile is computed whole.
    rows = min(ext["i"], 6 if target.vector_lanes <= 8 else 8)
    cols = _vector_tile(ext["j"], target.vector_lanes)
    few = ext["i"] <= FEW_ROWS and ext["j"] >= 4 * target.vector_lanes
    if few:   # 4 vectors of columns: a row or two has too few accumulators to hide the FMA latency
        cols = 4 * target.vector_lanes
    s = Schedule(op).tile("i", "j", rows, cols)
    # small: the cores split the row tiles (of every matrix of a batch), each reading B in place
    small = 4 * ext["k"] * ext["j"] <= SMALL_B_BYTES and ext.get("b", 1) * _ceil(ext["i"], rows) >= target.cores
    tiles, inner = ("i_o", "j_o") if small else ("j_o", "i_o")
    order = (tiles, inner, "k", "i_i", "j_i")
    s = s.reorder(*(("b",) + order if batch else order))
    s = s.cache_write(inner).vectorize("j_i").unroll("i_i")
    if batch:
        s = s.fuse("b", tiles)
        outer = f"b_{tiles}"
    else:
        outer = tiles
    s = s.parallel(outer)
    # A K x cols panel of B, contiguous rows, pays where row tiles reuse it or it pads a
    # tail of columns; one row tile reads B once: without the copy 1.3-2.1x faster on the
    # 12 products of 1-8 rows the rule was chosen on, 1.25-1.85x on 10 others (this CPU;
    # with a tail of columns the copy was faster on 2 of 3, 1.2-2.2x).
    once = ext["i"] <= rows and (ext["j"] % cols == 0 or few)
    if 4 * ext["k"] * cols <= MAX_LOCAL_BYTES and not (once or small):
        s = s.cache_read("B", outer)
    return s


def _is_pointwise(op: Operator) -> bool:
    """A 1x1 convolution with stride 1 and no padding: its fused pixels index the image
    linearly (``y*W + x``), one run of the flattened image."""
    p = op.params
    return (p["R"], p["S"], p["stride"], p["pad"]) == (1, 1, 1, 0)


def _pointwise(op: Operator, target: Target) -> Schedule | None:
    """A 1x1 convolution (stride 1, no padding) is a matrix product of the weights
    (K x C) with the image (C x H*W): fused ``y*x`` indexes linearly, so it is tiled
    like matmul's columns. Parallel over the image's tiles where there are enough of
    them and no tail, else over the output channels (the image's tiles then run in
    serial, so a tail tile is shifted back inside, not clamped)."""
    ext = op.extents
    if op.kind == "depthwise_conv2d" or not _is_pointwise(op):
        return None
    hw, lanes = ext["y"] * ext["x"], target.vector_lanes
    cols = _pick(hw, (2 * lanes, lanes)) if hw > 64 else hw
    rows = min(ext["k"], 8 if lanes >= 16 else 6)
    s = Schedule(op).fuse("y", "x").tile("k", "y_x", rows, cols)
    if hw % cols == 0 and hw // cols >= 4 * target.cores:
        s = s.reorder("n", "y_x_o", "k_o", "c", "ry", "rx", "k_i", "y_x_i")
        s = s.cache_write("k_o").vectorize("y_x_i").unroll("k_i").fuse("n", "y_x_o")
        return s.parallel("n_y_x_o")
    s = s.reorder("n", "k_o", "y_x_o", "c", "ry", "rx", "k_i", "y_x_i")
    s = s.cache_write("y_x_o").vectorize("y_x_i").unroll("k_i").fuse("n", "k_o")
    return s.parallel("n_k_o")


def _pixel_tile(x: int, lanes: int, vectors: int = 1) -> tuple[int, int]:
    """(rows, columns) of output pixels per register tile of ``vectors`` vectors of
    channels each: up to 16 accumulators of AVX-512's 32 registers (8 of AVX2's 16). A
    row that short is taken whole, a longer one in columns that divide it where one of
    a few do (a tail of columns costs as much as a full tile)."""
    most = (16 if lanes >= 16 else 8) // vectors
    widths = (8, 4) if vectors == 1 else (4, 8, 7)
    cols = x if x <= most else next((c for c in widths if x % c == 0 and c <= most), min(8, most))
    return max(f for f in (1, *FACTORS) if f * cols <= most), cols


def _channels_vectorized(op: Operator, target: Target) -> Schedule | None:
    """A convolution whose output channels fill vectors vectorises over them: each input
    element is broadcast against a vector of weights, which the weights' pack stores
    channel-last (the pack follows the loops, see ``ir/lower._pack_order``); the output
    is written once per tile. Along a row a vector would gather (a stride) or be mostly
    tail (7 to 28 columns), and even on wide rows this ran 1.5x faster than vectors along
    the row (this CPU, 64 channels at 56x56). The weights of one channel block are packed
    once per block; the input's padded rows once per band of tiles (packed per tile, the
    overlapping windows were copied again for each tile: 3x3 layers 1.2-1.3x faster with
    the band), or the whole padded image once per block where the bands are one row high
    and their windows overlap (each input row would be copied R / stride times)."""
    ext, lanes = op.extents, target.vector_lanes
    if op.kind == "depthwise_conv2d" or ext["k"] % lanes:
        return None
    # Two vectors of channels per tile halve the broadcasts per multiply-add (this CPU:
    # the strided 3x3 layers of ResNet-18 from 0.58 to 0.92 of torch, its 7x7 stem from
    # 0.55 to 0.77; 256 channels at 14x14 1.2x faster), where the channel blocks, run in
    # parallel, still give every core one.
    vectors = 2 if ext["k"] % (2 * lanes) == 0 and ext["n"] * ext["k"] // (2 * lanes) >= target.cores else 1
    rows, cols = _pixel_tile(ext["x"], lanes, vectors)
    rows = min(rows, ext["y"])
    s = Schedule(op).split("k", lanes * vectors).split("x", cols).split("c", min(ext["c"], 64))
    channels = ("k_i",)
    if vectors > 1:
        s, channels = s.split("k_i", lanes), ("k_i_o", "k_i_i")
    y_outer, y_inner = ("y_o", ("y_i",)) if rows > 1 else ("y", ())
    if rows > 1:
        s = s.split("y", rows)
    s = s.reorder("n", "k_o", y_outer, "x_o", "c_o", "c_i", "ry", "rx", *y_inner, "x_i", *channels)
    s = s.cache_write("x_o").vectorize(channels[-1])
    for loop in (*channels[:-1], "x_i"):  # unrolled from the inside out
        s = s.unroll(loop)
    for loop in y_inner:
        s = s.unroll(loop)
    s = s.fuse("n", "k_o").parallel("n_k_o")
    try:
        s = s.cache_read("W", "n_k_o")       # the whole channel block's weights, once
    except ValueError:
        s = s.cache_read("W", "c_o")         # too large for a local buffer: per input slice
    anchors = (y_outer, "c_o")
    if rows == 1 and op.params["R"] > op.params["stride"]:
        anchors = ("n_k_o",) + anchors
    for anchor in anchors[:-1]:              # the first whose buffer fits
        try:
            return s.cache_read("I", anchor)
        except ValueError:
            continue
    return s.cache_read("I", anchors[-1])


def _depthwise_channels_vectorized(op: Operator, target: Target) -> Schedule | None:
    """A depthwise convolution whose rows a vector would gather along (a stride) or
    overhang (at most one vector wide) vectorises over its channels instead: the input,
    packed channel-last once per block of channels (the pack follows the loops), and
    the weights load a vector of channels per window position. This CPU (AVX-512),
    against the vectors along the row: 1.1-3.3x on the 8 such layers the rule was chosen
    on, 1.1-3.1x on 13 others; 0.77-1.0x on wider rows at stride 1, which keep them.
    Vectors of 8 channels ran 1.03-1.4x faster than 16 on all 13 layers timed (a tune
    found them first)."""
    ext, p = op.extents, op.params
    lanes = min(target.vector_lanes, 8)
    if op.kind != "depthwise_conv2d" or ext["c"] % lanes or (p["stride"] == 1 and ext["x"] > target.vector_lanes):
        return None
    rows, cols = _pixel_tile(ext["x"], target.vector_lanes)
    rows, x = min(rows, ext["y"]), ext["x"]
    s = Schedule(op).split("c", lanes)
    if cols >= x:
        tile, inner = None, ["x"]
    else:
        s, tile, inner = s.split("x", cols), "x_o", ["x_i"]
    y_outer = "y_o" if rows > 1 else "y"
    if rows > 1:
        s, inner = s.split("y", rows), ["y_i", *inner]
    s = s.reorder("n", "c_o", y_outer, *([tile] if tile else []), "ry", "rx", *inner, "c_i")
    s = s.cache_write(tile or y_outer).vectorize("c_i")
    for loop in (*reversed(inner), "rx"):   # unrolled from the inside out
        s = s.unroll(loop)
    s = s.fuse("n", "c_o").parallel("n_c_o").cache_read("W", "n_c_o")
    for anchor in ("n_c_o", y_outer):   # the whole padded image, else a band of rows
        try:
            return s.cache_read("I", anchor)
        except ValueError:   # too large for a local buffer
            continue
    return s


def _conv2d(op: Operator, target: Target) -> Schedule:
    for special in (_pointwise, _channels_vectorized, _depthwise_channels_vectorized):
        s = special(op, target)
        if s is not None:
            return s
    ext = op.extents
    depthwise = op.kind == "depthwise_conv2d"
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


# ---------------------------------------------------------------- GPU (CUDA)
#
# The classic shared-memory tiling: each block computes a block tile of the output,
# each thread a small register tile of it (cache_write at the innermost thread loop,
# unrolled and vectorized so it stays in registers); the reduction runs in slices,
# and for each slice the block stages the inputs it reads in shared memory
# (cache_read at the slice loop), which every thread then reads many times.

def _ceil(a: int, b: int) -> int:
    return -(-a // b)


def split_loop(s: Schedule, loop: str, factor: int) -> tuple[Schedule, str, str | None]:
    """(``s`` with ``loop`` split by ``factor``, the outer loop, the inner one); a factor of
    1 leaves the loop whole and names no inner loop (the environment splits by 2 and more).
    Experts and sketches build their tiles with it."""
    return (s, loop, None) if factor == 1 else (s.split(loop, factor), f"{loop}_o", f"{loop}_i")


# Tiles measured on an H100 (fp32, TF32 off): a 128x64 block tile of 8x4 register
# tiles with k slices of 32 ran at 38-40 TFLOP/s at 1024-4096 (128x128 of 8x8 in slices
# of 8: 15-24). Smaller products need smaller tiles so that the multiprocessors get work.
# On an H200 (fp32, 2026-12-04: seven tiles, each timed against 128x64 on 101 products,
# BENCHMARKS "CUDA kernels") 64x64 tiles of 8x4 register tiles (128 threads) ran at
# 0.98-1.03x of 128x64 on large products and up to 1.74x where 128x64 gives 36-64 blocks;
# 64x64 tiles of 4x4 (256 threads) were never faster than them there; below those, 32x32
# tiles of 4x4 (64 threads) or 2x2 (256). A tile is taken once it gives at least
# MATMUL_WAVES times as many blocks as multiprocessors: the expert's tile then ran at a
# geometric mean of 0.98 of the best of the seven (0.94 with the tiles and rule before) on
# the 57 products the thresholds were chosen on, and 0.98 (0.97) on 40 others.
# 32x64 tiles of 4x4 (128 threads; what tunes of 768 and 256x3072x768 found), taken from
# 1.5 blocks per multiprocessor, ran 1.04-1.17x faster than 32x32 of 4x4 on the 11 of 53
# products where the rule gives them (0.97-0.99 below 1.5, 0.86-0.95 where 64x64 is taken),
# then 1.00-1.18x (geomean 1.11, 2 of 45 below 1.0) on 45 products drawn afresh.
MATMUL_TILES = ((8, 4, 16, 16, 32), (8, 4, 8, 16, 32), (4, 4, 8, 16, 32), (4, 4, 8, 8, 32), (2, 2, 16, 16, 32))
MATMUL_WAVES = (3.0, 1.5, 1.5, 0.75)   # blocks per multiprocessor each tile but the last needs
# The direct convolution's tiles (channels x pixels per thread, threads z x y x x, input
# channels per slice; ``_gpu_conv2d``). The last, 2 channels x 2 pixels of 512 threads, ran
# 64 channels at 56x56 at about cuDNN's speed on an H100. Seven pixels of a row a thread
# reuse in registers the inputs a window slides over: where the grid has threads enough to
# hide latency (CONV_THREADS_PER_SM), the window is wider than one and the reduction has
# CONV_MIN_REDUCTION products an output, the 2x7 tile of 128 threads ran 0.89-2.09x the
# 2x2 one on the 25 of 46 layers the rule was chosen on where it takes it (geomean 1.47),
# then 0.85-2.15x (geomean 1.32, 3 of 14 below 1.0) on 27 layers drawn afterwards (H200,
# fp32: BENCHMARKS "conv-tiles-cuda"). Where threads are fewer (0.35-1.00x), in pointwise
# layers (no window to reuse: 0.32-0.72x) and a 3-channel stem's 3x3 window (0.63x), 2x2
# stays. 4x7 of 64 threads where those get enough ran 1.12-1.37x faster than 2x7 on 7
# layers, then 0.60-1.11x on 6 fresh ones: not taken.
CONV_TILES = ((2, 7, 8, 2, 8, 4), (2, 2, 8, 2, 32, 8))
CONV_THREADS_PER_SM = (96,)   # the threads each tile but the last needs per multiprocessor
CONV_MIN_REDUCTION = 64


def _blocks(op: Operator, rows: int, cols: int) -> int:
    """Blocks in the grid of a (batched) product in tiles of ``rows`` x ``cols``: each
    matrix of a batch (blockIdx.z) has its own. Counting them (H200, fp32, 12 batched
    products such as attention's 96 x 128 x 128 x 64) ran 1.0-1.86x faster than counting
    one matrix's (0.93 on 4 x 1024 x 1024 x 64); the tensor-core tiles below count one
    matrix's: counting the batch's gave smaller tiles, 0.88-1.04x on 6 bf16 products."""
    ext = op.extents
    return ext.get("b", 1) * _ceil(ext["i"], rows) * _ceil(ext["j"], cols)


def _matmul_tile(op: Operator, target: Target) -> tuple[int, int, int, int, int]:
    """The largest tile that gives the multiprocessors enough blocks (MATMUL_WAVES)."""
    for tile, waves in zip(MATMUL_TILES, MATMUL_WAVES):
        tm, tn, ty, tx, _ = tile
        if _blocks(op, tm * ty, tn * tx) >= waves * max(target.sm_count, 1):
            return tile
    return MATMUL_TILES[-1]


def _conv_threads(op: Operator, tile: tuple[int, int, int, int, int, int]) -> int:
    """Threads in the grid of ``_gpu_conv2d(op, target, tile)``: its blocks times the
    threads of a block that have outputs (a row narrower than the tile leaves some out)."""
    ext = op.extents
    tk, xw, tz, ty, tx, _ = tile
    xw, rows, chans = min(xw, ext["x"]), min(ext["y"], ty), min(ext["k"], tk * tz)
    blocks = ext["n"] * _ceil(ext["k"], chans) * _ceil(ext["y"], rows)
    return blocks * _ceil(chans, tk) * rows * _ceil(min(ext["x"], tx * xw), xw)


def _conv_tile(op: Operator, target: Target) -> tuple[int, int, int, int, int, int]:
    """The first of CONV_TILES whose grid has CONV_THREADS_PER_SM threads per multiprocessor,
    where a thread's pixels share window inputs and the reduction is long enough."""
    ext = op.extents
    if op.kind == "depthwise_conv2d" or ext["rx"] == 1 or ext["c"] * ext["ry"] * ext["rx"] < CONV_MIN_REDUCTION:
        return CONV_TILES[-1]
    for tile, need in zip(CONV_TILES, CONV_THREADS_PER_SM):
        if _conv_threads(op, tile) >= need * max(target.sm_count, 1):
            return tile
    return CONV_TILES[-1]


def _bind_grid(s: Schedule, batch: bool, block_rows: str, block_cols: str, thread_rows: str | None,
               thread_cols: str | None) -> Schedule:
    """A matmul's grid: the batch on blockIdx.z, block tiles on blockIdx.y/x, the threads
    of a block on threadIdx.y/x (None: no such loop, one thread along that axis)."""
    for loop, axis in (("b" if batch else None, "blockIdx.z"), (block_rows, "blockIdx.y"),
                       (block_cols, "blockIdx.x"), (thread_rows, "threadIdx.y"), (thread_cols, "threadIdx.x")):
        if loop:
            s = s.bind(loop, axis)
    return s


def _gpu_matmul(op: Operator, target: Target, batch: bool,
                tile: tuple[int, int, int, int, int] | None = None) -> Schedule:
    """``tile`` = (thread rows, thread cols, threads y, threads x, k slice); by default
    from :data:`MATMUL_TILES`."""
    ext = op.extents
    m, n, k = ext["i"], ext["j"], ext["k"]
    tm, tn, ty, tx, bk = tile or _matmul_tile(op, target)
    tm, tn = min(tm, m), min(tn, n)
    ty, tx = min(ty, _ceil(m, tm)), min(tx, _ceil(n, tn))
    # inner tiles first, so every split factor is a small one (the environment's factors)
    s = Schedule(op).split("i", tm).split("i_o", ty).split("j", tn).split("j_o", tx).split("k", min(bk, k))
    order = ("i_o_o", "j_o_o", "i_o_i", "j_o_i", "k_o", "k_i", "i_i", "j_i")
    s = _bind_grid(s.reorder(*(("b",) + order if batch else order)), batch, *order[:4])
    s = s.cache_write("j_o_i").cache_read("A", "k_o").cache_read("B", "k_o")
    s = s.vectorize("j_i").unroll("i_i").unroll("k_i")
    # H200, 4096: two buffers (cp.async) from 0.77 to 0.85 of cuBLAS; three no better.
    # Tried on the H200 against this kernel (32 and 94 products): A's stage transposed
    # (k rows, filled by 4-byte cp.async) 0.73-0.82x; A read 16 bytes along k (one shared
    # load for 4 k steps, 12 for 128 FMAs instead of 36) 0.89-1.03x, 1.00 at 4096: the
    # shared-memory reads are not what holds it at 0.86-0.90 of cuBLAS. Nor the tile: 66
    # variants at 4096 (8x4 to 16x8 a thread, 128 or 256 threads, slices of 16 or 32, 2
    # or 3 buffers; 3 rounds each) ran at 0.56-1.03x of this kernel.
    # Nor occupancy (3 blocks a multiprocessor), FMA order, block order or L2 hints (H100).
    return _pipelined(s, ("A", "B"), target, 2)


# Tensor cores (tf32, bf16, fp16): a block of warps y x warps x computes a tile of the
# output, each warp (16-row tiles x 8-column tiles) instructions of 16 x 8, over k slices
# of MMA_K_SLICE_BYTES per row staged in shared memory, in a pipeline of MMA_BUFFERS
# slices (the next ones copied while this one is used) where they fit. The largest tile
# that still gives every multiprocessor a block is taken.
# Measured on an H200 (bf16, 4096 and 2048): 128 x 128 tiles of 2 x 2 warps of 64 x 64,
# slices of 32 elements, 4 buffers ran at 0.40-0.42 of cuBLAS; 8 warps of 64 x 32 (the
# previous tile) 0.31-0.34, 128 x 256 of 8 warps 0.30-0.34, slices of 64 elements slower.
MMA_TILES = ((2, 2, 4, 8), (2, 2, 2, 2))   # (warps y, warps x, 16-row tiles, 8-column tiles per warp)
# fp32 on tensor cores (3xTF32, kernels.ir.dtypes): 128 x 64 blocks of 2 x 2 warps, each 64 x 32,
# where the grid has SPLIT_MIN_BLOCKS of them per multiprocessor. On an H100 (3 alternating
# rounds with cuBLAS, fp32, TF32 off), on 36 products (28 drawn, seeded, 512-8192 a side; 8 of
# the gpu family's train split and others, none held out): the 23 with 2.5 blocks a
# multiprocessor or more ran at 0.93-1.13 of cuBLAS where the SIMT expert ran 0.79-1.02 (all
# 23 faster, geomean 1.13x); on 12 of the 13 below, the SIMT expert was faster. 128 x 128 blocks
# of 4 x 2 warps and 32 x 64 of 1 x 2 were mostly slower above 2.5. Batched products stay on the
# CUDA cores (not measured). Warps of 32 x 64 ((2, 2, 2, 8)) with k slices of 32 (slice_bytes=128),
# what tunes found, ran 0.995-1.153x this tile on those 23 (geomean 1.043): the next candidate,
# once its benchmark rows are measured (BENCHMARKS, "CUDA kernels").
SPLIT_MMA_TILES = ((2, 2, 4, 4),)
SPLIT_MIN_BLOCKS = 2.5
MMA_K_SLICE_BYTES = 64   # a stage's rows of A: 32 bf16/fp16 or 16 tf32 elements
MMA_BUFFERS = 4


def _pipelined(s: Schedule, tensors: tuple[str, ...], target: Target, buffers: int) -> Schedule:
    """``s`` with the stages of ``tensors`` in the deepest pipeline of at most ``buffers``
    slices that the loop and shared memory allow; ``s`` itself where none does."""
    for depth in range(buffers, 1, -1):
        try:
            piped = s
            for _ in range(depth - 1):
                piped = functools.reduce(Schedule.double_buffer, tensors, piped)
            check_for_target(piped, target)
            return piped
        except ValueError:   # one slice, a tail, or no room
            continue
    return s


def _gpu_matmul_tensor_cores(op: Operator, target: Target, batch: bool, tiles=MMA_TILES,
                             slice_bytes: int = MMA_K_SLICE_BYTES, buffers: int = MMA_BUFFERS) -> Schedule:
    ext = op.extents
    m, n, k = ext["i"], ext["j"], ext["k"]
    mk = DTYPES[op.dtype].mma_k
    for wy, wx, fm, fn in tiles:
        if _ceil(m, 16 * fm * wy) * _ceil(n, 8 * fn * wx) >= max(target.sm_count, 1):
            break
    fm, fn = min(fm, _ceil(m, 16)), min(fn, _ceil(n, 8))
    wy, wx = min(wy, _ceil(m, 16 * fm)), min(wx, _ceil(n, 8 * fn))
    # instructions per k slice: the most that fit the slice and divide K (no tail: the stages
    # can be pipelined)
    ks = next(f for f in range(slice_bytes // (mk * DTYPES[op.dtype].bytes), 0, -1) if (k // mk) % f == 0)
    # the instruction's tile innermost first: the environment's mask lets a warp's tile
    # grow past one thread's registers only once the nest is tensorized
    s = Schedule(op).split("i", 16).split("j", 8).split("k", mk)
    s = s.reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i").tensorize("i_i", "j_i", "k_i")
    # a factor of 1 splits nothing (the environment, whose policies imitate this, cannot)
    s, i_rest, i_tiles = split_loop(s, "i_o", fm)
    s, i_block, i_warps = split_loop(s, i_rest, wy)
    s, j_rest, j_tiles = split_loop(s, "j_o", fn)
    s, j_block, j_warps = split_loop(s, j_rest, wx)
    s, k_slices, k_steps = split_loop(s, "k_o", ks)
    order = [n for n in ("b" if batch else None, i_block, j_block, i_warps, j_warps, k_slices, k_steps, i_tiles,
                         j_tiles) if n]
    s = _bind_grid(s.reorder(*order), batch, i_block, j_block, i_warps, j_warps)
    s = s.cache_write(j_warps or i_warps or j_block).cache_read("A", k_slices).cache_read("B", k_slices)
    for loop in (j_tiles, i_tiles, k_steps):
        if loop:
            s = s.unroll(loop)
    return _pipelined(s, ("A", "B"), target, buffers)


# Warpgroups (wgmma, Hopper, tf32/bf16/fp16): a block of 64-row warpgroups over a tile of
# WGMMA_TILES (rows, columns), k slices of a 128-byte row (64 elements, 32 in tf32) in a
# pipeline of 4.
# Measured on an H200 (bf16, 4096): 128 x 256 (two warpgroups, each m64n256) 0.68 of
# cuBLAS, 128 x 128 0.57, 64 x 128 0.53, 3 buffers instead of 4 0.60; at 1000 x 1000 x 512
# and 256 x 3072 x 768, whose grids of large tiles leave multiprocessors idle, 64 x 128
# ran at 1.4 and 2.3 of cuBLAS. The largest tile that gives every multiprocessor a block.
# tf32, whose B stage is filled element by element (transposed), wants more threads per
# element of B: at 4096 256 x 128 (four warpgroups, 512 threads) ran at 0.54 of cuBLAS,
# 128 x 256 at 0.47, 128 x 128 at 0.40 (H200, 4 buffers; 3 buffers 0.46, 0.40, 0.41).
WGMMA_TILES = ((128, 256), (128, 128), (64, 128))
WGMMA_TILES_K_MAJOR = ((256, 128), (128, 128), (64, 128))


def _gpu_matmul_warpgroup(op: Operator, target: Target, batch: bool, tiles=None,
                          buffers: int = MMA_BUFFERS) -> Schedule:
    """The product on warpgroups; ScheduleError where the nest cannot be one (see
    :func:`kernels.ir.schedule.warpgroup_tile`)."""
    tiles = tiles or (WGMMA_TILES_K_MAJOR if b_k_major(op.dtype) else WGMMA_TILES)
    m, n = op.extents["i"], op.extents["j"]
    for rows, cols in tiles:
        if _ceil(m, rows) * _ceil(n, cols) >= max(target.sm_count, 1):
            break
    # a split's factor stays within its loop: whole warpgroups, whole 64-column blocks
    warps, tiles_n = min(rows // 16, _ceil(m, 16) // 4 * 4), min(cols // 8, _ceil(n, 8) // 8 * 8)
    if not warps or not tiles_n:
        raise ScheduleError(f"{op.shape_str}: fewer than 64 rows or 64 columns for a warpgroup")
    mk = DTYPES[op.dtype].mma_k
    s = Schedule(op).split("i", 16).split("j", 8).split("k", mk)
    s = s.reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i").tensorize("i_i", "j_i", "k_i")
    s = s.split("i_o", warps).split("j_o", tiles_n).split("k_o", WGMMA_ROW_BYTES // DTYPES[op.dtype].bytes // mk)
    order = ("i_o_o", "j_o_o", "i_o_i", "k_o_o", "k_o_i", "j_o_i")
    s = s.reorder(*(("b",) + order if batch else order))
    if batch:
        s = s.bind("b", "blockIdx.z")
    s = s.bind("i_o_o", "blockIdx.y").bind("j_o_o", "blockIdx.x").bind("i_o_i", "threadIdx.y")
    s = s.cache_write("i_o_i").cache_read("A", "k_o_o").cache_read("B", "k_o_o")
    s = s.unroll("j_o_i").unroll("k_o_i")
    return _pipelined(s, ("A", "B"), target, buffers).warpgroup()


def _gpu_matmul_any(op: Operator, target: Target, batch: bool) -> Schedule:
    """On warpgroups where the GPU (Hopper) and the shape allow, else on tensor cores
    where the dtype has them, the product holds one instruction's tile and K has no tail
    of the instruction's k."""
    mk, ext = DTYPES[op.dtype].mma_k, op.extents
    if DTYPES[op.dtype].split:
        wy, wx, fm, fn = SPLIT_MMA_TILES[0]
        if not batch and ext["k"] % mk == 0 and target.sm80 and \
                _blocks(op, 16 * wy * fm, 8 * wx * fn) >= SPLIT_MIN_BLOCKS * max(target.sm_count, 1):
            return _gpu_matmul_tensor_cores(op, target, batch, tiles=SPLIT_MMA_TILES)
        return _gpu_matmul(op, target, batch)
    if target.arch == "sm_90" and op.dtype in WGMMA_DTYPES and ext["k"] % mk == 0:
        try:
            wg = _gpu_matmul_warpgroup(op, target, batch)
            check_for_target(wg, target)
            return wg
        except ScheduleError:   # a tail, a layout or a size wgmma does not take
            pass
    if mk and ext["k"] % mk == 0 and ext["i"] >= 16 and ext["j"] >= 8:
        return _gpu_matmul_tensor_cores(op, target, batch)
    return _gpu_matmul(op, target, batch)


def _gpu_conv2d(op: Operator, target: Target,
                tile: tuple[int, int, int, int, int, int] | None = None, stage: bool = True) -> Schedule:
    """Direct convolution (no im2col). ``tile`` = (channels per thread, pixels per thread,
    threads z over channels, threads y over rows, threads x over columns, input channels
    per slice; by default ``_conv_tile``): a block computes a few output rows of a group of
    channels; per slice of input channels, it stages the input rows and the weights it needs."""

    ext = op.extents
    tile = tile or _conv_tile(op, target)
    depthwise = op.kind == "depthwise_conv2d"
    ch = "c" if depthwise else "k"
    tk, xw, tz, ty, tx, cb = tile
    tk, xw = (1 if depthwise else min(tk, ext[ch])), min(xw, ext["x"])
    bh = min(ext["y"], ty)
    bc = min(ext[ch], tk * tz)
    # a thread's pixels split off first, then the threads of a row: block widths such as
    # 8 x 7 are no factor of the action table, each of their factors is
    s = Schedule(op).split("x", xw).split("x_o", min(tx, _ceil(ext["x"], xw)))
    s = s.split("y", bh).split(ch, bc).split(f"{ch}_i", tk)
    order = ["n", f"{ch}_o", "y_o", "x_o_o", f"{ch}_i_o", "y_i", "x_o_i"]
    reduce = ["ry", "rx"] if depthwise else ["c_o", "c_i", "ry", "rx"]
    if not depthwise:
        s = s.split("c", min(cb, ext["c"]))
    s = s.reorder(*order, *reduce, f"{ch}_i_i", "x_i")
    s = (s.bind("n", "blockIdx.z").bind(f"{ch}_o", "blockIdx.y").bind("y_o", "blockIdx.x")
         .bind(f"{ch}_i_o", "threadIdx.z").bind("y_i", "threadIdx.y").bind("x_o_i", "threadIdx.x"))
    s = s.cache_write("x_o_i").vectorize("x_i").unroll(f"{ch}_i_i").unroll("rx").unroll("ry")
    anchor = "x_o_i" if depthwise else "c_o"
    for tensors in (("I", "W"), ("W",), ()) if stage else ((),):  # stage what fits in shared memory
        staged = s
        for t in tensors:
            staged = staged.cache_read(t, anchor)
        try:
            check_for_target(staged, target)
            return staged
        except ValueError:
            continue
    return s


# Implicit GEMM on tensor cores: the instruction's k is 16 input channels (8 in tf32) at
# one window position, its n 8 output channels, its m 16 outputs along one axis: pixels
# of a row, or where rows are narrower the image's pixels as one fused axis (contiguous in
# NCHW; its stage holds the rows that a block's run of pixels spans), or else images at
# one pixel. H200, bf16, ResNet-50's pointwise layers at 14x14 and 7x7, batch 16: fused
# pixels 1.6-3.2x faster than 16 images a plane apart (what a tune found first).
# A warp holds (m tiles, channel tiles) of instructions, a block (warps y, warps x) of
# warps; per slice of input channels the block stages the input and weights it reads.
CONV_MMA_TILES = ((2, 2, 4, 4), (2, 2, 2, 4), (2, 1, 2, 2), (1, 1, 1, 2))   # (warps y, warps x, m tiles, 8-channel tiles)
CONV_MMA_BUFFERS = 2
# The widest tiles whose blocks fill this fraction of the multiprocessors: 128 blocks of 4
# warps on the H200's 132 (one wave) ran ResNet-50's batch-16 layers at 7x7 outputs 1.05x
# (3x3) and 1.95x (3x3, stride 2) faster than the next tiles' 512 blocks of 2 warps.
CONV_MMA_MIN_FILL = 0.9
# Fused pixels are staged where the input's rows are at least this wide (its stage: the
# rows a block's run spans, halo and all, filled in chunks of 16, 8 or 4 bytes, or an
# element at a time in rows of 7 bf16 elements; without a window, the run itself of the
# flattened image); otherwise read in place, through the caches. H200, bf16, ResNet-50,
# staged against in place: the 3x3 layers at 14x14 outputs 1.5-2.3x faster (batch 1 and
# 16) and the strided one from 14x14 inputs 1.3x; the pointwise layers at 14x14 1.5-1.9x
# (one 0.98x); at 7x7 inputs the 3x3 layer 0.9x and the pointwise ones 0.6-0.9x (one
# 1.08x). The search may take either: the stage is an action like any other.
FUSED_STAGE_MIN_WIDTH = 8


def _conv_m_axis(op: Operator) -> str | None:
    """The implicit GEMM's m: pixels of a row (``x``), the image's pixels fused (``y_x``), or
    images (``n``); None where none has 16. A pointwise layer (1x1, stride 1, no padding)
    takes the fused pixels whatever its rows: they are one run of the flattened image,
    staged whole in 16-byte chunks with no row's tail (H200, bf16, ResNet-50's pointwise
    layers at 28x28 and 56x56: batch 16 1.3-2.5x faster than m along rows of 28 or 56,
    batch 1 1.0-1.6x)."""
    ext = op.extents
    if ext["x"] >= 16 and not (_is_pointwise(op) and ext["y"] > 1):
        return "x"
    if ext["y"] * ext["x"] >= 16:
        return "y_x"
    return "n" if ext["n"] >= 16 else None


def _gpu_conv2d_tensor_cores(op: Operator, target: Target) -> Schedule | None:
    """Built in the order the environment's actions can rebuild it (its policies imitate
    it): the instruction's tile innermost and tensorized first, so a warp's tile may grow
    past one thread's registers, and the block's m loops fused into one grid axis before the
    channels are tiled, so the nest never holds more than the action table's loops."""
    ext = op.extents
    mk = DTYPES[op.dtype].mma_k
    s, m = Schedule(op), _conv_m_axis(op)
    if m == "x":       # m: 16 pixels of a row; a warp's m tiles: rows
        s, tiles, around = s.split("x", 16), "y", ("n", "x_o")
    elif m == "y_x":   # m: 16 pixels of the image
        s, tiles, around = s.fuse("y", "x").split("y_x", 16), "y_x_o", ("n",)
    elif m == "n":     # m: 16 images; a warp's m tiles: pixels of a row
        s, tiles, around = s.split("n", 16), "x", ("n_o", "y")
    else:
        return None
    tile_extent = next(l.extent for l in s.nest.loops if l.name == tiles)
    m_tiles = math.prod(l.extent for l in s.nest.loops if not l.reduce and l.axis != "k" and l.name != f"{m}_i")
    blocks = lambda wy, wx, fm, fn: _ceil(m_tiles, fm * wy) * _ceil(ext["k"], 8 * fn * wx)
    for wy, wx, fm, fn in CONV_MMA_TILES:
        if blocks(wy, wx, fm, fn) >= CONV_MMA_MIN_FILL * max(target.sm_count, 1):
            break
    fm, fn = min(fm, tile_extent), min(fn, _ceil(ext["k"], 8))
    wy, wx = min(wy, _ceil(tile_extent, fm)), min(wx, _ceil(ext["k"], 8 * fn))
    # each loop moved while it is still whole: the fewest swaps for the environment to replay
    s = s.reorder(*around, tiles, *(l.name for l in s.nest.loops
                                    if not l.reduce and l.name not in (*around, tiles)))
    mma = (f"{m}_i", "k_i", "c_i")
    s = s.split("k", 8).split("c", mk)
    s = s.reorder(*(l.name for l in s.nest.loops if l.name not in mma), *mma).tensorize(*mma)
    s, tiles_o, tiles_i = split_loop(s, tiles, fm)
    s, block_m, warps_m = split_loop(s, tiles_o, wy)
    block = (*around, block_m)
    for i in range(1, len(block)):
        s = s.fuse("_".join(block[:i]), block[i])
    s, k_o, k_tiles = split_loop(s, "k_o", fn)
    s = s.reorder(*(n for n in ("_".join(block), k_o, warps_m, "c_o", "ry", "rx", tiles_i, k_tiles) if n), *mma)
    s, k_block, warps_k = split_loop(s, k_o, wx)
    in_place = m == "y_x" and op.tensor("I").shape[-1] < FUSED_STAGE_MIN_WIDTH
    staged = ("W",) if in_place else ("I", "W")
    loops = dict(block="_".join(block), k_block=k_block, warps_m=warps_m, warps_k=warps_k,
                 tiles_i=tiles_i, k_tiles=k_tiles)
    # the widest slice of channels whose stages fit shared memory, twice (double-buffered) if they can
    for ks in range(MMA_K_SLICE_BYTES // (mk * DTYPES[op.dtype].bytes), 0, -1):
        if (ext["c"] // mk) % ks:
            continue
        sliced, c_slices, c_steps = split_loop(s, "c_o", ks)
        sliced = _pipelined(_conv_tensor_core_nest(sliced, loops, c_slices, c_steps, staged), staged, target,
                            CONV_MMA_BUFFERS)
        try:
            check_for_target(sliced, target)
            return sliced
        except ValueError:   # no room for one slice
            continue
    return None


def _conv_tensor_core_nest(s: Schedule, loops: dict[str, str | None], c_slices: str, c_steps: str | None,
                           staged: tuple[str, ...]) -> Schedule:
    """Grid, warps, accumulators and stages around the tensorized tile: the block's m loop
    on blockIdx.y, its output channels on blockIdx.x, warps over m and channels on
    threadIdx.y/x, per slice of input channels a stage of each tensor in ``staged``."""
    def present(*names):
        return [n for n in names if n]

    L = loops
    inner = s.nest.loops[-3:]
    s = s.reorder(*present(L["block"], L["k_block"], L["warps_k"], L["warps_m"], c_slices, "ry", "rx", c_steps,
                           L["tiles_i"], L["k_tiles"]), *(l.name for l in inner))
    s = s.bind(L["block"], "blockIdx.y").bind(L["k_block"], "blockIdx.x")
    for loop, axis in ((L["warps_m"], "threadIdx.y"), (L["warps_k"], "threadIdx.x")):
        if loop:
            s = s.bind(loop, axis)
    s = s.cache_write(present(L["k_block"], L["warps_k"], L["warps_m"])[-1])
    for loop in present(L["k_tiles"], L["tiles_i"], c_steps):
        s = s.unroll(loop)
    return functools.reduce(lambda s, t: s.cache_read(t, c_slices), staged, s)


# Below this many outputs per channel a window larger than 1x1 runs faster as a direct
# convolution on the CUDA cores: the implicit GEMM's 16-pixel m tiles then leave much of
# each instruction and of the GPU idle (H200, bf16, with stages filled in 16-byte chunks:
# ResNet-50's 3x3 layers on tensor cores 1.2-4x faster than direct from 196 outputs a
# channel, the 7x7 layer at batch 1, 49 outputs, 0.74x).
TENSOR_CORE_MIN_PIXELS = 128
# fp32 (3xTF32) takes tensor cores for pointwise layers only: on 19 1x1 layers (the conv2d
# gpu-many train split's first 14 at batch 1, 5 more at batch 8-16; H100, 3 alternating rounds
# with cuDNN) 1.13-2.61x faster than the direct expert (geomean 1.44x); on 6 3x3 layers of
# ResNet-50 (batch 1 and 16) 0.28-0.73x.


def _gpu_conv2d_any(op: Operator, target: Target) -> Schedule:
    """On tensor cores where the dtype has them, the channels fill the instruction and
    the convolution is pointwise or has outputs enough."""
    mk, ext = DTYPES[op.dtype].mma_k, op.extents
    pointwise = ext["ry"] * ext["rx"] == 1
    wide = pointwise or ext["n"] * ext["y"] * ext["x"] >= TENSOR_CORE_MIN_PIXELS
    if op.kind != "depthwise_conv2d" and mk and ext["c"] % mk == 0 and ext["k"] >= 8 and \
            (pointwise and target.sm80 if DTYPES[op.dtype].split else wide):
        s = _gpu_conv2d_tensor_cores(op, target)
        if s is not None:
            return s
    return _gpu_conv2d(op, target)


_EXPERTS = {
    "cpu": {"matmul": functools.partial(_matmul, batch=False),
            "dense_bias_relu": functools.partial(_matmul, batch=False),
            "batch_matmul": functools.partial(_matmul, batch=True),
            "conv2d": _conv2d, "depthwise_conv2d": _conv2d, "conv2d_bias_relu": _conv2d},
    "cuda": {"matmul": functools.partial(_gpu_matmul_any, batch=False),
             "dense_bias_relu": functools.partial(_gpu_matmul_any, batch=False),
             "batch_matmul": functools.partial(_gpu_matmul_any, batch=True),
             "conv2d": _gpu_conv2d_any, "depthwise_conv2d": _gpu_conv2d,
             "conv2d_bias_relu": _gpu_conv2d_any},
}


def expert_schedule(op: Operator, target: Target) -> Schedule:
    """The hand-written schedule for ``op`` on ``target``."""
    if target.kind not in _EXPERTS:
        raise ValueError(f"no expert schedule for target {target.kind!r}")
    if target.kind == "cuda" and not target.max_threads_per_block:
        raise ValueError(f"cuda target {target.device!r} has no GPU limits; use get_target('cuda') "
                         "or cuda_target_for_compile()")
    builder = _EXPERTS[target.kind].get(op.kind)
    if builder is None:
        raise ValueError(f"no expert schedule for {op.kind!r}")
    return builder(op, target)
