"""The environment's action table, its legality mask, and expert replay.

One ``Discrete`` space per operator kind, the same for every shape: an action is
(primitive, loop slot, factor slot) where a loop slot is a position in the current
nest (outermost = 0) and a factor slot indexes :data:`FACTORS`.

The mask is computed from the nest directly (no trial application, so it is fast)
and is deliberately a little stricter than the schedule IR: once a cache stage is
anchored at a loop, structural steps (split, tile, swap, fuse) may only touch
loops outside every anchor, so they cannot change a cache's tile or footprint.
Every action the mask allows applies without :class:`ScheduleError` (tested).

The table depends on the target: ``parallel`` (OpenMP) exists only on a CPU,
``bind`` (a loop to ``blockIdx``/``threadIdx``) only on CUDA. On CUDA the mask also
keeps every state *completable*, so that every allowed sequence ends in a kernel
that passes the GPU's rules (:func:`kernels.cuda.check_for_target`):

- bound loops stay outside every reduction and never move; blocks bind outside
  threads; thread counts and grid sizes stay within the device's limits;
- until a loop is bound, the outermost loop stays serial and spatial (it can always
  be bound to ``blockIdx.x``);
- the spatial loops inside the first reduction (tails of splits included) hold at
  most one thread's tile of outputs, so ``cache_write`` just outside it always fits
  in registers;
- ``cache_read`` (a shared-memory stage) needs a bound loop, lies inside every block
  loop and outside every unrolled one, and fits in the block's shared memory; after it,
  nothing more is bound and no loop around it is unrolled;
- ``tensorize`` (one action; fp32 as 3xTF32) takes the three innermost loops when
  they form a tensor-core tile (:func:`kernels.ir.schedule.tensor_tile`); from then on
  those loops never move, split or change kind, each thread is a warp (32 threads of
  the block) and the register tile limit is per lane (32 times larger per warp);
- ``warpgroup`` (Hopper) once the tensorized nest is one that wgmma can issue
  (:func:`kernels.ir.schedule.warpgroup_tile`); after it only ``double_buffer`` and
  ``done`` remain;
- ``done`` is allowed once the schedule is complete, and when the steps left are
  only enough to complete it, only the completing actions are (a bind, then a
  ``cache_write``, then ``done``).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass, replace

import numpy as np

from kernels.codegen.rules import shared_bytes
from kernels.ir.lower import stage_bytes, stage_elements, stage_footprint
from kernels.ir.ops import Operator
from kernels.ir.schedule import (FACTORS, MAX_BUFFERS, MAX_LOCAL_BYTES, MAX_UNROLL, MAX_UNROLLED_BODY, THREAD_AXES,
                                 WARP, Bind, CacheRead, CacheWrite, DoubleBuffer, Fuse, LoopNest, Parallel, Reorder,
                                 Schedule, ScheduleError, Split, Step, Tensorize, Tile, Unroll, Vectorize, Warpgroup,
                                 bound_axis, tensor_tile, warpgroup_tile)
from kernels.target import Target, cpu_target

MAX_LOOPS = 13  # the GPU conv2d expert's nest: 13 loops

STRUCTURAL = ("split", "tile", "swap", "fuse")
ANNOTATIONS = {"cpu": ("vectorize", "unroll", "parallel", "cache_write"),
               "cuda": ("vectorize", "unroll", "cache_write")}


@dataclass(frozen=True)
class Action:
    primitive: str           # split, tile, swap, fuse, vectorize, unroll, parallel, bind, cache_write,
                             # cache_read, tensorize, done
    slot: int = 0            # loop position, outermost = 0
    factor: int = 0          # index into FACTORS (split, tile)
    tensor: str = ""         # cache_read only
    axis: str = ""           # bind only: blockIdx.x ... threadIdx.z


def factor_for(extent: int, f: int) -> int:
    """Factor slot ``f`` on a loop of ``extent``: ``FACTORS[f]``, at most the extent."""
    return min(FACTORS[f], extent)


def factor_allowed(extent: int, f: int) -> bool:
    """Slots whose factors fit, plus the first one that does not (it means 'the whole
    extent'), so each distinct factor has exactly one slot."""
    return bool(factor_slots(extent)[f])


@functools.lru_cache(maxsize=4096)
def factor_slots(extent: int) -> np.ndarray:
    """``factor_allowed`` for every factor slot at once."""
    first_above = next((i for i, v in enumerate(FACTORS) if v >= extent), len(FACTORS))
    out = np.array([v <= extent or i == first_above for i, v in enumerate(FACTORS)])
    out.flags.writeable = False
    return out


class NestInfo:
    """What the mask and the features need about one nest, computed once."""

    def __init__(self, op: Operator, nest: LoopNest):
        self.op, self.nest = op, nest
        self.loops = nest.loops
        self.names = {l.name for l in nest.loops}
        positions = [nest.index(a) for a in nest.anchors()]
        self.first_anchor = min(positions) if positions else len(self.loops)
        # per access: per dimension, the index expression over loop variables
        self.access_dims = {access.tensor: nest.access_exprs(access) for access in op.accesses}
        self._coefs: dict[str, list] = {}
        self._footprints: dict[str, list] = {}

    def coefs(self, tensor: str) -> list[list[int | None]]:
        """[dim][loop] coefficient of each loop variable in ``tensor``'s index (None: not linear)."""
        if tensor not in self._coefs:
            rows = []
            for e in self.access_dims[tensor]:
                linear, nonlinear = e.coefs()
                rows.append([None if l.name in nonlinear else linear.get(l.name, 0) for l in self.loops])
            self._coefs[tensor] = rows
        return self._coefs[tensor]

    def footprints(self, tensor: str) -> list[int | None]:
        """[slot] elements of ``tensor`` that the loops at positions >= slot read (the box
        that ``cache_read`` at slot - 1 would copy); None where a fused loop makes it no box."""
        if tensor not in self._footprints:
            rows, n = self.coefs(tensor), len(self.loops)
            sizes: list[int | None] = [1] * (n + 1)
            spans = [0] * len(rows)
            box = True
            for i in range(n - 1, -1, -1):
                for d, row in enumerate(rows):
                    if row[i] is None:
                        box = False
                    else:
                        spans[d] += abs(row[i]) * (self.loops[i].extent - 1)
                sizes[i] = math.prod(s + 1 for s in spans) if box else None
            self._footprints[tensor] = sizes
        return self._footprints[tensor]


class ActionTable:
    """The fixed action list of one operator kind on one kind of target."""

    def __init__(self, op: Operator, target: Target | None = None):
        self.kind, self.op = op.kind, op
        self.target = target or cpu_target()
        self.gpu = self.target.kind == "cuda"
        self.inputs = (op.lhs.tensor, op.rhs.tensor)
        table: list[Action] = []
        for s in range(MAX_LOOPS):
            table += [Action("split", s, f) for f in range(len(FACTORS))]
        for s in range(MAX_LOOPS - 1):
            table += [Action("tile", s, f) for f in range(len(FACTORS))]
        for prim in ("swap", "fuse"):
            table += [Action(prim, s) for s in range(MAX_LOOPS - 1)]
        for prim in ANNOTATIONS[self.target.kind]:
            table += [Action(prim, s) for s in range(MAX_LOOPS)]
        if self.gpu:
            for axis in THREAD_AXES:
                table += [Action("bind", s, axis=axis) for s in range(MAX_LOOPS)]
        for t in self.inputs:
            table += [Action("cache_read", s, tensor=t) for s in range(MAX_LOOPS)]
        if self.gpu:
            table.append(Action("tensorize"))
            table += [Action("double_buffer", tensor=t) for t in self.inputs]
            table.append(Action("warpgroup"))
        table.append(Action("done"))
        self.actions = tuple(table)
        self.index = {a: i for i, a in enumerate(self.actions)}
        self.done = len(table) - 1
        self.is_primitive = {p: np.array([a.primitive == p for a in table]) for p in {a.primitive for a in table}}
        # positions by (primitive, slot[, factor]) for the mask's hot loop
        self.at: dict[str, list] = {}
        for i, a in enumerate(self.actions):
            if a.primitive in ("split", "tile"):
                self.at.setdefault(a.primitive, [[] for _ in range(MAX_LOOPS)])[a.slot].append(i)
            else:
                self.at.setdefault(a.primitive + a.tensor + a.axis, [None] * MAX_LOOPS)[a.slot] = i

    def __len__(self) -> int:
        return len(self.actions)

    # ------------------------------------------------------------ decoding
    def to_step(self, action: int, nest: LoopNest) -> Step | None:
        """The schedule step of ``action`` on ``nest`` (None for done); ScheduleError when
        the action names a slot the nest does not have."""
        a = self.actions[action]
        if a.primitive == "done":
            return None
        loops = nest.loops
        if a.primitive == "tensorize":
            return Tensorize(*(tensor_tile(self.op, nest) or ("?", "?", "?")))
        if a.primitive == "double_buffer":
            return DoubleBuffer(a.tensor)
        if a.primitive == "warpgroup":
            return Warpgroup()
        two = a.primitive in ("tile", "swap", "fuse")
        if a.slot + (1 if two else 0) >= len(loops):
            raise ScheduleError(f"{a.primitive} at loop slot {a.slot}: the nest has {len(loops)} loops")
        l = loops[a.slot]
        if a.primitive == "split":
            return Split(l.name, factor_for(l.extent, a.factor))
        if a.primitive == "tile":
            m = loops[a.slot + 1]
            return Tile(l.name, m.name, factor_for(l.extent, a.factor), factor_for(m.extent, a.factor))
        if a.primitive == "swap":
            return Reorder((loops[a.slot + 1].name, l.name))
        if a.primitive == "fuse":
            return Fuse(l.name, loops[a.slot + 1].name)
        if a.primitive == "cache_read":
            return CacheRead(a.tensor, l.name)
        if a.primitive == "bind":
            return Bind(l.name, a.axis)

        return {"vectorize": Vectorize, "unroll": Unroll, "parallel": Parallel,
                "cache_write": CacheWrite}[a.primitive](l.name)

    # ------------------------------------------------------------ legality
    def mask(self, info: NestInfo, last: int | None = None, steps_left: int | None = None) -> np.ndarray:
        """Legal actions on ``info``'s nest. ``last`` (the previous action), if a swap, is
        masked too: taking it again would only undo it (and lets a policy loop); so is fusing
        the two halves of one split, in either order, which gives back the split loop or
        it traversed in another order (and, repeated with splits, doubled the length of the
        loop names each time: a policy built a 134 MB schedule key that way).
        ``steps_left`` (this one included): with one left only ``done`` is allowed; on
        CUDA, with only enough left to complete the schedule, only the completing ones."""
        loops, n, nest = info.loops, len(info.loops), info.nest
        gpu = self.gpu
        allowed = np.zeros(len(self.actions), dtype=bool)
        has_parallel = any(l.kind == "parallel" for l in loops)
        unrolled = math.prod(l.extent for l in loops if l.kind == "unroll")
        first_reduce = min((i for i, l in enumerate(loops) if l.reduce), default=n)
        # an unrolled loop may only hold unrolled or vectorized loops: the first slot from
        # which every loop inward is one of those
        tensorized = set(nest.tensorized)   # one instruction: they count as unrolled, and stay put
        kept = {dict(nest.cache_reads)[t] for t in nest.double_buffered}   # loops that stay serial
        tile_from = n
        while tile_from > 0 and (loops[tile_from - 1].kind in ("unroll", "vectorize")
                                 or loops[tile_from - 1].name in tensorized):
            tile_from -= 1
        spatial_inside = [1] * (n + 1)  # product of spatial extents at positions >= i
        for i in range(n - 1, -1, -1):
            spatial_inside[i] = spatial_inside[i + 1] * (1 if loops[i].reduce else loops[i].extent)
        cached = {t for t, _ in nest.cache_reads}
        # on CUDA a stage lies outside every unrolled loop (the target's rule)
        first_unrolled = min((i for i, l in enumerate(loops) if l.kind == "unroll"), default=n)
        last_stage = max((nest.index(a) for _, a in nest.cache_reads), default=-1)
        at = self.at
        gpu_rules = _GpuRules(self, info, first_reduce, spatial_inside[first_reduce]) if gpu else None
        if gpu:
            reads = gpu_rules.cache_reads(cached)
        else:
            footprints = {t: info.footprints(t) for t in self.inputs if t not in cached}
            reads = [(at["cache_read" + t], [s is not None and 4 * s <= MAX_LOCAL_BYTES for s in sizes[1:]])
                     for t, sizes in footprints.items()]

        for i, l in enumerate(loops):
            serial = l.kind == "serial" and l.name not in tensorized and l.name not in kept
            free = serial and i < info.first_anchor   # structural steps may touch it
            if free and n < MAX_LOOPS and f"{l.name}_o" not in info.names and f"{l.name}_i" not in info.names:
                allowed[at["split"][i]] = factor_slots(l.extent) & (gpu_rules.split_factors(i) if gpu else True)
            if i + 1 < n:
                m = loops[i + 1]
                both_free = free and m.kind == "serial" and m.name not in tensorized and i + 1 < info.first_anchor
                if both_free and n + 2 <= MAX_LOOPS and \
                        {f"{x}_{y}" for x in (l.name, m.name) for y in "oi"}.isdisjoint(info.names):
                    allowed[at["tile"][i]] = factor_slots(l.extent) & factor_slots(m.extent) & \
                        (gpu_rules.tile_factors(i) if gpu else True)
                if i + 1 < info.first_anchor and m.kind != "vectorize" and l.kind != "parallel" and \
                        (m.kind != "unroll" or l.kind == "unroll") and (not gpu or gpu_rules.swap(i)) and \
                        (l.name in tensorized) == (m.name in tensorized):
                    allowed[at["swap"][i]] = True
                halves = {l.name[:-2] + "_o", l.name[:-2] + "_i"} == {l.name, m.name}   # one split's two halves
                if both_free and l.reduce == m.reduce and not halves and f"{l.name}_{m.name}" not in info.names:
                    allowed[at["fuse"][i]] = True
            if serial:
                keep = not gpu or gpu_rules.annotate(i)
                allowed[at["vectorize"][i]] = keep and i == n - 1 and not l.reduce and \
                    (not gpu or l.extent <= MAX_UNROLL)
                allowed[at["unroll"][i]] = (keep and i + 1 >= tile_from and l.extent <= MAX_UNROLL
                                            and unrolled * l.extent <= MAX_UNROLLED_BODY
                                            and (not gpu or i > last_stage))
                if gpu:
                    for axis in THREAD_AXES:
                        allowed[at["bind" + axis][i]] = gpu_rules.bind(i, axis)
                else:
                    allowed[at["parallel"][i]] = i == 0 and not l.reduce and not has_parallel
            if nest.cache_write is None and l.name not in tensorized:
                allowed[at["cache_write"][i]] = first_reduce > i and 4 * spatial_inside[i + 1] <= MAX_LOCAL_BYTES \
                    and (not gpu or gpu_rules.cache_write(i, spatial_inside[i + 1]))
            for slots, fits in reads:
                allowed[slots[i]] = fits[i] and l.name not in tensorized and (not gpu or i < first_unrolled)
        if gpu:
            allowed[at["tensorize"][0]] = gpu_rules.tensorize()
            for t in self.inputs:
                allowed[at["double_buffer" + t][0]] = gpu_rules.double_buffer(t)
            allowed[at["warpgroup"][0]] = gpu_rules.warpgroup()
            if nest.warpgroup:   # the nest is final: only deeper pipelines, or done
                allowed &= self.is_primitive["double_buffer"] | self.is_primitive["done"]
        if last is not None and self.actions[last].primitive == "swap":
            allowed[last] = False
        allowed[self.done] = not gpu or gpu_rules.complete
        if steps_left is not None and steps_left <= 1:
            allowed[:] = False
            allowed[self.done] = True
        elif gpu and steps_left is not None and steps_left <= gpu_rules.steps_to_complete:
            allowed &= self.is_primitive["cache_write" if gpu_rules.bound else "bind"]
        return allowed

    def complete(self, info: NestInfo) -> bool:
        """Whether the nest is a finished kernel for the target (``done`` is allowed)."""
        return bool(self.mask(info)[self.done])

    # ------------------------------------------------------------ replay
    def actions_for(self, schedule: Schedule) -> list[int]:
        """Env actions that rebuild ``schedule``'s loop nest from scratch (then ``done``).

        Reorders become adjacent swaps and tiles become splits and swaps; raises
        ScheduleError when a step has no action (a factor outside FACTORS).
        """
        current = Schedule(schedule.op)
        out: list[int] = []

        def take(a: Action) -> None:
            nonlocal current
            if a not in self.index:
                raise ScheduleError(f"{a} is not in the action table (at most {MAX_LOOPS} loops)")
            i = self.index[a]
            step = self.to_step(i, current.nest)
            current = current.apply(step)
            out.append(i)

        for step in schedule.steps:
            nest = current.nest
            if isinstance(step, Split):
                take(Action("split", nest.index(step.loop), self._factor_slot(nest.loop(step.loop).extent,
                                                                              step.factor, step)))
            elif isinstance(step, Tile):
                take(Action("split", nest.index(step.outer),
                            self._factor_slot(nest.loop(step.outer).extent, step.outer_factor, step)))
                take(Action("split", current.nest.index(step.inner),
                            self._factor_slot(current.nest.loop(step.inner).extent, step.inner_factor, step)))
                o, i = step.outer, step.inner
                self._swaps(current.nest, (f"{o}_o", f"{i}_o", f"{o}_i", f"{i}_i"), take, lambda: current.nest)
            elif isinstance(step, Reorder):
                self._swaps(nest, step.order, take, lambda: current.nest)
            elif isinstance(step, Fuse):
                take(Action("fuse", nest.index(step.outer)))
            elif isinstance(step, CacheRead):
                take(Action("cache_read", nest.index(step.loop), tensor=step.tensor))
            elif isinstance(step, Bind):
                take(Action("bind", nest.index(step.loop), axis=step.thread_axis))
            elif isinstance(step, Tensorize):
                take(Action("tensorize"))
            elif isinstance(step, DoubleBuffer):
                take(Action("double_buffer", tensor=step.tensor))
            elif isinstance(step, Warpgroup):
                take(Action("warpgroup"))
            else:
                prim = {Vectorize: "vectorize", Unroll: "unroll", Parallel: "parallel",
                        CacheWrite: "cache_write"}[type(step)]
                take(Action(prim, nest.index(step.loop)))
        return out + [self.done]

    @staticmethod
    def _factor_slot(extent: int, factor: int, step: Step) -> int:
        for f in range(len(FACTORS)):
            if factor_allowed(extent, f) and factor_for(extent, f) == factor:
                return f
        raise ScheduleError(f"{step}: factor {factor} has no action (factors: {FACTORS})")

    @staticmethod
    def _swaps(nest: LoopNest, order, take, current_nest) -> None:
        """Adjacent swaps that put ``order`` into the positions those loops hold."""
        slots = sorted(nest.index(n) for n in order)
        target = [l.name for l in nest.loops]
        for slot, name in zip(slots, order):
            target[slot] = name
        for pos, name in enumerate(target):
            i = current_nest().index(name)
            while i > pos:
                take(Action("swap", i - 1))
                i -= 1


class _GpuRules:
    """The CUDA part of :meth:`ActionTable.mask` for one nest (see the module docstring)."""

    def __init__(self, table: ActionTable, info: NestInfo, first_reduce: int, inner_tile: int):
        self.table, self.info, self.first_reduce = table, info, first_reduce
        # spatial iterations inside the first reduction: they all end up in one thread's tile
        self.inner_tile = inner_tile
        loops, nest = info.loops, info.nest
        # one thread's accumulators; a warp's in a tensorized nest
        self.tile_floats = table.target.tile_bytes // 4 * (WARP if nest.tensorized else 1)
        self.lanes = WARP if nest.tensorized else 1
        self.loops = loops
        self.bound = [i for i, l in enumerate(loops) if bound_axis(l)]
        self.axes = {bound_axis(loops[i]) for i in self.bound}
        blocks = [i for i in self.bound if bound_axis(loops[i]).startswith("blockIdx")]
        threads = [i for i in self.bound if i not in blocks]
        self.last_block = blocks[-1] if blocks else -1
        self.first_thread = threads[0] if threads else len(loops)
        self.threads = math.prod(loops[i].extent for i in threads) * self.lanes
        self.thread_x = next((loops[i].extent for i in threads if bound_axis(loops[i]) == "threadIdx.x"), 1)
        self.write_at = nest.index(nest.cache_write) if nest.cache_write else None
        self.complete = bool(self.bound) and self.write_at is not None
        self.shared = shared_bytes(info.op, nest)   # what the stages take, every buffer
        self.steps_to_complete = 1 + (not self.bound) + (self.write_at is None)

    def annotate(self, i: int) -> bool:
        """Until something is bound, the outermost loop stays serial (bindable)."""
        return i > 0 or bool(self.bound)

    def swap(self, i: int) -> bool:
        l, m = self.loops[i], self.loops[i + 1]
        if bound_axis(l) or bound_axis(m):
            return False
        if i == 0 and not self.bound and m.reduce:
            return False
        if i + 1 == self.first_reduce and not l.reduce and m.reduce:
            return self.inner_tile * l.extent <= self.tile_floats
        return True

    def _grown(self, loop, f: int) -> int:
        """The extent a split by factor slot ``f`` leaves ``loop`` with, tail included."""
        factor = factor_for(loop.extent, f)
        return -(-loop.extent // factor) * factor

    def split_factors(self, i: int) -> np.ndarray | bool:
        """A split with a tail enlarges a spatial loop inside the first reduction."""
        l = self.loops[i]
        if i <= self.first_reduce or l.reduce:
            return True
        rest = self.inner_tile // l.extent
        return np.array([rest * self._grown(l, f) <= self.tile_floats for f in range(len(FACTORS))])

    def tile_factors(self, i: int) -> np.ndarray | bool:
        """A tile of a spatial loop and the first reduction moves the spatial loop's inner
        part inside it; inside the first reduction, tails enlarge spatial loops."""
        l, m = self.loops[i], self.loops[i + 1]
        if i + 1 < self.first_reduce:
            return True
        if i + 1 == self.first_reduce:   # l is spatial, m the first reduction
            return np.array([self.inner_tile * factor_for(l.extent, f) <= self.tile_floats
                             for f in range(len(FACTORS))])
        spatial = [x for x in (l, m) if not x.reduce]
        rest = self.inner_tile // math.prod(x.extent for x in spatial)
        return np.array([rest * math.prod(self._grown(x, f) for x in spatial) <= self.tile_floats
                         for f in range(len(FACTORS))])

    def bind(self, i: int, axis: str) -> bool:
        l, t = self.loops[i], self.table.target
        if axis in self.axes or l.reduce or i >= self.first_reduce or self.info.nest.cache_reads:
            return False
        if self.write_at is not None and i > self.write_at:
            return False
        if axis.startswith("blockIdx"):
            return i < self.first_thread and l.extent <= t.max_grid["xyz".index(axis[-1])]
        lanes = self.lanes if axis == "threadIdx.x" else 1
        return (i > self.last_block and l.extent * lanes <= t.max_block["xyz".index(axis[-1])]
                and self.threads * l.extent <= t.max_threads_per_block)

    def double_buffer(self, tensor: str) -> bool:
        """A staged input, its loop serial and twice or more, fewer than
        MAX_BUFFERS buffers, and room in shared memory for one more (of every stage that
        its loop pipelines)."""
        nest, t = self.info.nest, self.table.target
        anchor = dict(nest.cache_reads).get(tensor)
        if anchor is None or nest.double_buffered.count(tensor) + 1 >= MAX_BUFFERS or not t.sm80:
            return False
        loop = nest.loop(anchor)
        if loop.kind != "serial" or loop.extent < 2:
            return False
        deeper = replace(nest, double_buffered=nest.double_buffered + (tensor,))
        return shared_bytes(self.info.op, deeper) <= t.shared_bytes_per_block

    def tensorize(self) -> bool:
        """The innermost loops form a tile, and the block's threads can become warps."""
        t, nest = self.table.target, self.info.nest
        if tensor_tile(self.info.op, nest) is None:
            return False
        if not t.sm80:
            return False
        return (self.threads * WARP <= t.max_threads_per_block
                and self.thread_x * WARP <= t.max_block[0])

    def warpgroup(self) -> bool:
        """A tensorized nest that wgmma can issue (:func:`kernels.ir.schedule.warpgroup_tile`)
        on Hopper, its stages still fitting shared memory with the 1 KiB they are aligned by."""
        t, nest = self.table.target, self.info.nest
        if not nest.tensorized or nest.warpgroup or t.arch != "sm_90":
            return False
        try:
            warpgroup_tile(self.info.op, nest, Warpgroup())
        except ScheduleError:
            return False
        return shared_bytes(self.info.op, replace(nest, warpgroup=True)) <= t.shared_bytes_per_block

    def cache_write(self, i: int, tile: int) -> bool:
        return (not self.bound or i >= self.bound[-1]) and tile <= self.tile_floats

    def cache_reads(self, cached: set[str]) -> list[tuple[list, list[bool]]]:
        """(action positions, fits per slot) of each input not yet staged in shared memory."""
        op, nest, n = self.info.op, self.info.nest, len(self.loops)
        room = self.table.target.shared_bytes_per_block

        def size(tensor: str, anchor: str) -> int | None:   # as the rule counts it (chunks, padding)
            dims = stage_footprint(op, nest, tensor, anchor)
            return None if dims is None else stage_bytes(stage_elements(op, nest, dims), op.dtype)

        room -= self.shared
        out = []
        for t in self.table.inputs:
            if t in cached:
                continue
            fits = [False] * n
            if self.bound:
                for i in range(max(self.last_block, 0), n):
                    b = size(t, self.loops[i].name)
                    fits[i] = b is not None and b <= room
            out.append((self.table.at["cache_read" + t], fits))
        return out
