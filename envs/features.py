"""Shape-agnostic observation features of a loop nest.

Extents, strides and footprints enter as ``log2(1 + x)``, so one policy sees shapes
of any size on the same scale; nothing names a concrete shape. Rows are loop
slots (outermost first, zero-padded to ``MAX_LOOPS``), then the globals: the
operator, the schedule's progress, and the target (cores, vector lanes, caches; a
GPU's shared memory and registers), so one policy can serve machines it was not
trained on.

Columns are addressed by name: ``LOOP[name]`` and ``GLOBAL[name]`` are the slices the
tables :data:`LOOP_FEATURES` and :data:`GLOBAL_FEATURES` give them. A new feature is
one entry in a table, one value in :func:`featurize` and one row in the observation
table of ``ScheduleEnv``'s docstring (a test holds the two tables together). It
changes the vector's size, so policies and cost models saved before no longer load:
retrain the shipped ones (``experiments/pretrained``), or, for a feature appended to
the globals, widen them: zero weights for its columns in each net's first layer, so
they decide as before (``log_axis_divisor`` was added so), and re-record the golden vectors of
``tests/envs/test_features.py``.
"""

from __future__ import annotations

import math

import numpy as np

from kernels.ir.ops import BASE_KIND, Operator
from kernels.ir.schedule import bound_axis
from kernels.target import Target

from .actions import MAX_LOOPS, NestInfo

KINDS = ("serial", "parallel", "vectorize", "unroll")
# A bound GPU loop shows in the "parallel" column (its iterations run concurrently):
# 1 for blocks, like a CPU's parallel loop, 2 for threads, the inner level.
PARALLEL_LEVEL = {"blockIdx": 1.0, "threadIdx": 2.0}
MAX_AXES = 7
# The operators the shipped policies and cost models know, as a one-hot; a variant shows as
# its base, an operator added since (kernels/ir/ops.py) as zeros: the observation keeps its
# size, so every shipped policy and cost model still loads and serves it zero-shot.
OP_KINDS = ("matmul", "dense_bias_relu", "batch_matmul", "conv2d", "depthwise_conv2d")

# (name, width): one row of the docstring table in ScheduleEnv per entry
LOOP_FEATURES = (
    ("present", 1),
    ("log_extent", 1),
    ("reduce", 1),
    ("kind", len(KINDS)),            # one-hot serial / parallel / vectorize / unroll (GPU: see PARALLEL_LEVEL)
    ("axis", MAX_AXES),              # one-hot: which op axis the loop came from
    ("fused", 1),                    # the loop is a fused loop (indices through div/mod)
    ("anchor", 3),                   # cache_write here; cache_read of lhs here; of rhs here (its buffers)
    ("log_stride", 3),               # |step| of output, lhs, rhs flat index per iteration
    ("log_footprint", 3),            # elements of output, lhs, rhs touched by this loop and those inside
)
GLOBAL_FEATURES = (
    ("op_kind", len(OP_KINDS)),
    ("log_flops", 1),
    ("log_intensity", 1),            # FLOPs per byte of all tensors
    ("log_cores", 1),
    ("log_vector_lanes", 1),
    ("log_cache_bytes", 3),          # L1d, L2, L3 data cache (a GPU: its L2, second column)
    ("log_shared_bytes", 1),         # shared memory a GPU block may use (0 on a CPU)
    ("log_registers", 2),            # a GPU's registers per block, per multiprocessor (0 on a CPU)
    ("step_fraction", 1),
    ("loop_fraction", 1),            # loops / MAX_LOOPS
    ("has", 4),                      # parallel, vectorize, cache_write, any cache_read
    ("log_axis_divisor", MAX_AXES),  # per op axis: log2 of the largest power of two (to 64) dividing its extent
)


def _columns(table: tuple[tuple[str, int], ...]) -> dict[str, slice]:
    """name -> the slice of its columns, in table order."""
    out, at = {}, 0
    for name, width in table:
        out[name] = slice(at, at + width)
        at += width
    return out


LOOP = _columns(LOOP_FEATURES)       # columns of one loop row
GLOBAL = _columns(GLOBAL_FEATURES)   # columns of the globals, counted from their start
LOOP_WIDTH = sum(w for _, w in LOOP_FEATURES)
GLOBAL_WIDTH = sum(w for _, w in GLOBAL_FEATURES)
ROWS = MAX_LOOPS * LOOP_WIDTH        # the loop rows come first in the flat vector, then the globals
SIZE = ROWS + GLOBAL_WIDTH
HIGH = 64.0  # every feature lies in [0, HIGH]


def _log(x: float) -> float:
    return math.log2(1.0 + x)


def featurize(op: Operator, info: NestInfo, target: Target, step_fraction: float) -> np.ndarray:
    nest, loops = info.nest, info.loops
    obs = np.zeros(SIZE, dtype=np.float32)
    axes = [a.name for a in op.axes]
    if len(axes) > MAX_AXES:
        raise ValueError(f"{op.kind} has {len(axes)} axes; the observation (policies, cost models) "
                         f"describes at most {MAX_AXES}")
    tensors = (op.out.tensor, op.lhs.tensor, op.rhs.tensor)
    shapes = [op.tensor(t).shape for t in tensors]
    strides = []  # [tensor][loop]: flat-index step of one iteration; None through a div/mod
    for t, shape in zip(tensors, shapes):
        coefs = info.coefs(t)
        row_strides = [math.prod(shape[d + 1:]) for d in range(len(shape))]
        per_loop = []
        for column in zip(*coefs):
            per_loop.append(None if None in column else sum(c * s for c, s in zip(column, row_strides)))
        strides.append(per_loop)
    footprints = [info.footprints(t) for t in tensors]
    cache_reads = dict(nest.cache_reads)
    n = len(loops)
    rows = obs[:n * LOOP_WIDTH].reshape(n, LOOP_WIDTH)
    axes_bound = [bound_axis(l) for l in loops]
    raw = np.empty((n, 7))  # extent, 3 strides, 3 footprints: log2(1 + x) below
    raw[:, 0] = [l.extent for l in loops]
    for k in range(3):
        raw[:, 1 + k] = [abs(x or 0) for x in strides[k]]
        full = math.prod(shapes[k])
        raw[:, 4 + k] = [full if fp is None else fp for fp in footprints[k][:n]]
    logs = np.log2(1.0 + raw)
    kind = [KINDS.index("parallel" if b else l.kind) for l, b in zip(loops, axes_bound)]
    # one entry per LOOP_FEATURES entry (and one per GLOBAL_FEATURES entry below)
    loop_columns = {
        "present": 1.0,
        "log_extent": logs[:, 0],
        "reduce": [l.reduce for l in loops],
        "kind": _one_hot(n, kind, len(KINDS), [PARALLEL_LEVEL[b.split(".")[0]] if b else 1.0 for b in axes_bound]),
        "axis": _one_hot(n, [axes.index(l.axis) for l in loops], MAX_AXES),
        "fused": [any(s[i] is None for s in strides) for i in range(n)],
        # a stage's anchor shows its buffers (1, or 2-4 pipelined): each double_buffer is seen
        "anchor": np.column_stack([[nest.cache_write == l.name for l in loops],
                                   [(cache_reads.get(tensors[1]) == l.name) * nest.buffers(tensors[1]) for l in loops],
                                   [(cache_reads.get(tensors[2]) == l.name) * nest.buffers(tensors[2]) for l in loops]]),
        "log_stride": logs[:, 1:4],
        "log_footprint": logs[:, 4:7],
    }
    _put(rows, LOOP, loop_columns)
    total_bytes = 4 * sum(math.prod(t.shape) for t in op.tensors)
    global_columns = {
        "op_kind": [float(BASE_KIND.get(op.kind, op.kind) == k) for k in OP_KINDS],
        "log_flops": _log(op.flops),
        "log_intensity": _log(op.flops / total_bytes),
        "log_cores": _log(target.cores),
        "log_vector_lanes": _log(target.vector_lanes),
        "log_cache_bytes": [_log(target.l1_bytes), _log(target.l2_bytes), _log(target.l3_bytes)],
        "log_shared_bytes": _log(target.shared_bytes_per_block),
        "log_registers": [_log(target.registers_per_block), _log(target.registers_per_sm)],
        "step_fraction": step_fraction,
        "loop_fraction": len(loops) / MAX_LOOPS,
        "has": [float(any(l.kind == "parallel" for l in loops) or any(axes_bound)),
                float(any(l.kind == "vectorize" for l in loops)),
                float(nest.cache_write is not None), float(bool(nest.cache_reads))],
        "log_axis_divisor": [_pow2_divisor(a.extent) for a in op.axes] + [0.0] * (MAX_AXES - len(op.axes)),
    }
    _put(obs[ROWS:], GLOBAL, global_columns)
    return obs


def _pow2_divisor(extent: int) -> float:
    """log2 of the largest power of two, up to 64, that divides ``extent``: whether a tile
    or an instruction's shape divides an axis, which log extents do not show."""
    return float(min((extent & -extent).bit_length() - 1, 6))


def _put(block: np.ndarray, columns: dict[str, slice], values: dict) -> None:
    """Write ``values[name]`` into the columns of ``name`` (the last axis of ``block``),
    for every feature of the table ``columns`` was made from."""
    assert values.keys() == columns.keys(), f"features without a value or a column: {values.keys() ^ columns.keys()}"
    for name, value in values.items():
        c = columns[name]
        block[..., c.start if c.stop - c.start == 1 else c] = value


def _one_hot(n: int, index: list[int], width: int, value=1.0) -> np.ndarray:
    """(n, width) rows with ``value`` (one per row, or one for all) at ``index``."""
    out = np.zeros((n, width))
    out[np.arange(n), index] = value
    return out
