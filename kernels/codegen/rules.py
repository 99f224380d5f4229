"""Rules a schedule must follow on a given target, and a GPU schedule's launch shape.

The schedule IR is target-agnostic; what depends on the machine is checked here,
where the target is known, by :func:`check_for_target` (called by ``render``):

- binds only on CUDA, OpenMP ``parallel`` only on CPUs;
- on CUDA every launch needs a bound loop and a ``cache_write`` at or inside every
  bound loop (each thread accumulates its own outputs and writes each once);
- block, grid, thread-tile and shared-memory sizes within the target's limits
  (fields of :class:`kernels.target.Target`);
- a ``cache_read`` stage anchored inside every blockIdx loop, over a box, and outside
  every unrolled loop (its fill and barrier would be repeated in each unrolled copy);
- dtypes other than fp32, and ``tensorize``, only on CUDA (sm_80 or newer); a
  tensorized nest's threads are warps, so its block has 32 times the threads of its
  threadIdx loops (``threadIdx.x`` runs over warps, the lane is the rest);
- ``warpgroup`` (wgmma) only on Hopper (sm_90, compiled as sm_90a), with 1 KiB more
  shared memory to align its stages.

An unscheduled operator runs on a GPU with :func:`default_schedule`: one thread per
output element.
"""

from __future__ import annotations

import math
from typing import NoReturn

from ..ir.lower import stage_bytes, stage_elements, stage_footprint, thread_loops
from ..ir.ops import Operator
from ..ir.schedule import (WARP, Bind, DoubleBuffer, LoopNest, Parallel, Schedule, ScheduleError, Tensorize, Warpgroup,
                           bound_axis, footprint, tile_shape)
from ..target import Target

DEFAULT_THREADS = 256   # threads per block of the unscheduled kernel
WGMMA_ARCH = "sm_90a"   # wgmma is Hopper's alone: code for it is compiled for this architecture
WGMMA_ALIGN = 1024      # a swizzled stage starts at a multiple of this many bytes

Launch = tuple[tuple[int, int, int], tuple[int, int, int]]


def _fail(what: str, reason: str) -> NoReturn:
    raise ScheduleError(f"{what}: {reason}")


def launch_config(nest: LoopNest) -> Launch:
    """(grid, block): each axis is the extent of the loop bound to it, else 1; a tensorized
    nest's threads are warps: threadIdx.x is 32 times its loop's extent."""
    ext = {bound_axis(l): l.extent for l in nest.loops if bound_axis(l)}
    grid = tuple(ext.get(f"blockIdx.{a}", 1) for a in "xyz")
    block = tuple(ext.get(f"threadIdx.{a}", 1) * (WARP if nest.tensorized and a == "x" else 1) for a in "xyz")
    return grid, block  # type: ignore[return-value]


def shared_bytes(op: Operator, nest: LoopNest) -> int:
    """Bytes of shared memory the nest's stages take per block (each a multiple of 16
    bytes, as the CUDA renderer lays them out), every buffer of a pipelined stage."""
    total = 0
    for tensor, anchor in nest.cache_reads:
        dims = stage_footprint(op, nest, tensor, anchor)
        if dims:
            total += stage_bytes(nest.buffers(tensor) * stage_elements(op, nest, dims), op.dtype)
    return total + (WGMMA_ALIGN if nest.warpgroup and total else 0)


def check_dtype(dtype: str, target_kind: str) -> None:
    """Dtypes other than fp32 run on CUDA only (a clear error before anything is measured)."""
    if dtype != "fp32" and target_kind != "cuda":
        raise ScheduleError(f"dtype {dtype} runs on cuda only; on {target_kind} use fp32")


def check_for_target(schedule: Schedule, target: Target) -> None:
    """Raise ScheduleError if ``schedule`` breaks a rule of ``target`` (the schedule IR
    itself is target-agnostic: these are checked where the target is known)."""
    nest = schedule.nest
    bound = [l for l in nest.loops if bound_axis(l)]
    dtype = schedule.op.dtype
    check_dtype(dtype, target.kind)
    if target.kind != "cuda":
        for t in nest.double_buffered:
            _fail(str(DoubleBuffer(t)), f"asynchronous copies into shared memory need a cuda target, not {target.kind}")
        for l in bound:
            _fail(str(Bind(l.name, bound_axis(l))), f"binding to GPU axes needs a cuda target, not {target.kind}")
        if nest.tensorized:
            _fail(str(Tensorize(*nest.tensorized)), f"tensor cores need a cuda target, not {target.kind}")
        return
    if (dtype != "fp32" or nest.tensorized or nest.double_buffered) and not target.sm80:
        what = (str(Tensorize(*nest.tensorized)) if nest.tensorized else
                str(DoubleBuffer(nest.double_buffered[0])) if nest.double_buffered else f"dtype {dtype}")
        _fail(what, f"needs sm_80 or newer, not {target.arch}")
    if nest.warpgroup and target.arch and target.arch != "sm_90":
        _fail(str(Warpgroup()), f"wgmma runs on sm_90 (Hopper) only, not {target.arch}")
    for l in nest.loops:
        if l.kind == "parallel":
            _fail(str(Parallel(l.name)), "OpenMP loops are for CPUs; on cuda, bind loops to blockIdx/threadIdx")
    if not bound:
        _fail("schedule", "no loop is bound to a GPU axis: the kernel would run on a single thread")
    if not nest.cache_write:
        _fail("schedule", "on cuda the output needs cache_write at or inside every bound loop "
                          "(each thread accumulates its outputs privately and writes them once)")
    anchor = nest.index(nest.cache_write)
    inside = [l.name for l in bound if nest.index(l.name) > anchor]
    if inside:
        _fail(f"CacheWrite({nest.cache_write!r})", f"bound loop(s) {', '.join(inside)} lie inside it; "
                                                   "a thread's tile must not span other threads' outputs")
    tile = 4 * math.prod(l.extent for l in tile_shape(nest)) // (WARP if nest.tensorized else 1)
    if tile > target.tile_bytes:
        _fail(f"CacheWrite({nest.cache_write!r})", f"a thread's tile of {tile} bytes exceeds {target.tile_bytes} "
                                                   "(it would spill out of registers)")
    (gx, gy, gz), (bx, by, bz) = launch_config(nest)
    for axis, n, most in zip("xyz", (bx, by, bz), target.max_block):
        if n > most:
            _fail("schedule", f"threadIdx.{axis} extent {n} exceeds {most}")
    for axis, n, most in zip("xyz", (gx, gy, gz), target.max_grid):
        if n > most:
            _fail("schedule", f"blockIdx.{axis} extent {n} exceeds {most}")
    limit = target.max_threads_per_block
    if bx * by * bz > limit:
        _fail("schedule", f"{bx * by * bz} threads per block exceed the device's {limit}")
    last_block = max((nest.index(l.name) for l in bound if bound_axis(l).startswith("blockIdx")), default=-1)
    threads = thread_loops(nest)
    first_unrolled = min((i for i, l in enumerate(nest.loops) if l.kind == "unroll"), default=len(nest.loops))
    for tensor, at in nest.cache_reads:
        step = f"CacheRead({tensor!r}, {at!r})"
        if nest.index(at) >= first_unrolled:
            _fail(step, f"the stage lies in unrolled loop {nest.loops[first_unrolled].name!r}: its fill and barrier "
                        "would be repeated in every unrolled copy (code that takes NVRTC minutes)")
        if nest.index(at) < last_block:
            _fail(step, f"a shared stage belongs to one block: anchor it inside blockIdx loop "
                        f"{nest.loops[last_block].name!r}")
        if footprint(schedule.op, nest, tensor, at, also=threads) is None:
            _fail(step, "a thread loop or a loop inside is fused: the block's footprint is not a box")
    used, room = shared_bytes(schedule.op, nest), target.shared_bytes_per_block
    if used > room:
        _fail("schedule", f"shared stages take {used} bytes per block (limit {room})")


def default_schedule(op: Operator, target: Target) -> Schedule:
    """The unscheduled operator on a GPU: one thread per output element, blocks of up to
    256 threads along the innermost output axis, the next outer ones as grid y and z."""
    ext = op.extents
    spatial = [a.name for a in op.axes if not a.reduce]
    last = spatial[-1]
    s = Schedule(op).split(last, min(ext[last], DEFAULT_THREADS))
    s = s.bind(f"{last}_o", "blockIdx.x").bind(f"{last}_i", "threadIdx.x")
    for name, axis in zip(reversed(spatial[:-1]), ("blockIdx.y", "blockIdx.z")):
        if ext[name] <= target.max_grid["xyz".index(axis[-1])]:
            s = s.bind(name, axis)
    # serial outer loops first, then blockIdx z, y, x, then the threads
    rank = ("blockIdx.z", "blockIdx.y", "blockIdx.x", "threadIdx.x")
    loops = [l for l in s.nest.loops if not l.reduce]
    order = sorted(loops, key=lambda l: rank.index(bound_axis(l)) if bound_axis(l) else -1)
    return s.reorder(*(l.name for l in order)).cache_write(f"{last}_i")
