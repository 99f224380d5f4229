"""Features the cost model adds to the environment's (``envs.features``), for ranking
schedules of shapes it never saw: what a log-scaled extent hides (how well a vector
or parallel loop fills the lanes or cores, the work padded by split tails) and how
much runs inside each loop. The environment's observation does not change, so
policies are unaffected.

The model's vector is the environment's ``SIZE`` columns, then ``MAX_LOOPS`` rows of
``NEST_LOOP_WIDTH``, then ``NEST_GLOBAL_WIDTH`` globals.
"""

from __future__ import annotations

import math

import numpy as np

from envs.actions import MAX_LOOPS, NestInfo
from kernels.target import Target

NEST_LOOP_FEATURES = ("guarded",        # the loop's variable is in a split tail's guard
                      "log_inner",      # log2(1 + iterations of this loop and those inside it)
                      "log_bytes",      # log2(1 + bytes of all tensors this loop and those inside touch)
                      "lane_fill",      # vectorized: extent / extent rounded up to the lanes
                      "core_fill")      # parallel: extent / extent rounded up to the cores; bound to
                                        # blockIdx: the grid's blocks over whole waves of multiprocessors;
                                        # to threadIdx: the block's threads over whole warps
NEST_GLOBAL_FEATURES = ("log_padding",  # log2(iterations run / iterations needed), over all tails
                        "log_body",     # log2(1 + iterations of the innermost unrolled/vectorized loops)
                        "log_tile",     # log2(1 + elements of the cache_write tile)
                        "log_packed")   # log2(1 + elements of the cache_read buffers)
NEST_LOOP_WIDTH = len(NEST_LOOP_FEATURES)
NEST_GLOBAL_WIDTH = len(NEST_GLOBAL_FEATURES)
NEST_SIZE = MAX_LOOPS * NEST_LOOP_WIDTH + NEST_GLOBAL_WIDTH


def nest_features(info: NestInfo, target: Target) -> np.ndarray:
    """The NEST_SIZE columns of one loop nest (at most MAX_LOOPS loops)."""
    nest, loops, op = info.nest, info.loops, info.op
    tensors = (op.out.tensor, op.lhs.tensor, op.rhs.tensor)
    full = {t: math.prod(op.tensor(t).shape) for t in tensors}
    box = {t: [full[t] if f is None else f for f in info.footprints(t)] for t in tensors}   # [slot]
    out = np.zeros(NEST_SIZE, np.float32)
    rows = out[:MAX_LOOPS * NEST_LOOP_WIDTH].reshape(MAX_LOOPS, NEST_LOOP_WIDTH)
    guarded = {v for e, _ in nest.guards for v in e.vars()}
    extent = {l.name: l.extent for l in loops}
    padding = 0.0
    for e, n in nest.guards:
        linear, _ = e.coefs()
        covered = e.const + 1 + sum(c * (extent.get(v, 1) - 1) for v, c in linear.items())
        padding += math.log2(max(covered, n) / n)
    blocks = math.prod(l.extent for l in loops if l.kind.startswith("bind:blockIdx"))
    threads = math.prod(l.extent for l in loops if l.kind.startswith("bind:threadIdx"))
    inner = 1
    for i in range(len(loops) - 1, -1, -1):
        l = loops[i]
        inner *= l.extent
        if l.kind.startswith("bind:blockIdx"):      # the grid's last wave over the multiprocessors
            fill = blocks / _round_up(blocks, max(target.cores, 1))
        elif l.kind.startswith("bind:threadIdx"):   # the block's last warp
            fill = threads / _round_up(threads, target.vector_lanes)
        else:
            fill = l.extent / _round_up(l.extent, max(target.cores, 1)) if l.kind == "parallel" else 0.0
        rows[i] = (l.name in guarded, math.log2(1 + inner), math.log2(1 + 4 * sum(box[t][i] for t in tensors)),
                   l.extent / _round_up(l.extent, target.vector_lanes) if l.kind == "vectorize" else 0.0, fill)
    body = 1
    for l in reversed(loops):
        if l.kind not in ("unroll", "vectorize"):
            break
        body *= l.extent
    tile = box[tensors[0]][nest.index(nest.cache_write) + 1] if nest.cache_write else 0
    packed = sum(box[t][nest.index(at) + 1] for t, at in nest.cache_reads)
    out[MAX_LOOPS * NEST_LOOP_WIDTH:] = (padding, math.log2(1 + body) if body > 1 else 0.0,
                                         math.log2(1 + tile), math.log2(1 + packed))
    return out


def _round_up(x: int, m: int) -> int:
    return -(-x // m) * m
