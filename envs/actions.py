"""The environment's action table, its legality mask, and expert replay.

One ``Discrete`` space per operator kind, the same for every shape: an action is
(primitive, loop slot, factor slot) where a loop slot is a position in the current
nest (outermost = 0) and a factor slot indexes :data:`FACTORS`.

The mask is computed from the nest directly (no trial application, so it is fast)
and is deliberately a little stricter than the schedule IR: once a cache stage is
anchored at a loop, structural steps (split, tile, swap, fuse) may only touch
loops outside every anchor, so they cannot change a cache's tile or footprint.
Every action the mask allows applies without :class:`ScheduleError` (tested).
"""

from __future__ import annotations

import functools
import math
from dataclasses import dataclass

import numpy as np

from kernels.ops import Operator
from kernels.schedule import (MAX_LOCAL_BYTES, MAX_UNROLL, MAX_UNROLLED_BODY, CacheRead, CacheWrite, Fuse,
                              LoopNest, Parallel, Reorder, Schedule, ScheduleError, Split, Step, Tile,
                              Unroll, Vectorize)

MAX_LOOPS = 12
FACTORS = (2, 3, 4, 6, 8, 16, 32, 64)

STRUCTURAL = ("split", "tile", "swap", "fuse")
ANNOTATIONS = ("vectorize", "unroll", "parallel", "cache_write")


@dataclass(frozen=True)
class Action:
    primitive: str           # split, tile, swap, fuse, vectorize, unroll, parallel, cache_write, cache_read, done
    slot: int = 0            # loop position, outermost = 0
    factor: int = 0          # index into FACTORS (split, tile)
    tensor: str = ""         # cache_read only


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
    """The fixed action list of one operator kind."""

    def __init__(self, op: Operator):
        self.kind = op.kind
        self.inputs = (op.lhs.tensor, op.rhs.tensor)
        table: list[Action] = []
        for s in range(MAX_LOOPS):
            table += [Action("split", s, f) for f in range(len(FACTORS))]
        for s in range(MAX_LOOPS - 1):
            table += [Action("tile", s, f) for f in range(len(FACTORS))]
        for prim in ("swap", "fuse"):
            table += [Action(prim, s) for s in range(MAX_LOOPS - 1)]
        for prim in ANNOTATIONS:
            table += [Action(prim, s) for s in range(MAX_LOOPS)]
        for t in self.inputs:
            table += [Action("cache_read", s, tensor=t) for s in range(MAX_LOOPS)]
        table.append(Action("done"))
        self.actions = tuple(table)
        self.index = {a: i for i, a in enumerate(self.actions)}
        self.done = len(table) - 1
        # positions by (primitive, slot[, factor]) for the mask's hot loop
        self.at: dict[str, list] = {}
        for i, a in enumerate(self.actions):
            if a.primitive in ("split", "tile"):
                self.at.setdefault(a.primitive, [[] for _ in range(MAX_LOOPS)])[a.slot].append(i)
            else:
                self.at.setdefault(a.primitive + a.tensor, [None] * MAX_LOOPS)[a.slot] = i

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
        return {"vectorize": Vectorize, "unroll": Unroll, "parallel": Parallel,
                "cache_write": CacheWrite}[a.primitive](l.name)

    # ------------------------------------------------------------ legality
    def mask(self, info: NestInfo, last: int | None = None) -> np.ndarray:
        """Legal actions on ``info``'s nest; ``last`` (the previous action), if a swap, is
        masked too: taking it again would only undo it (and lets a policy loop)."""
        loops, n, nest = info.loops, len(info.loops), info.nest
        allowed = np.zeros(len(self.actions), dtype=bool)
        allowed[self.done] = True
        has_parallel = any(l.kind == "parallel" for l in loops)
        unrolled = math.prod(l.extent for l in loops if l.kind == "unroll")
        first_reduce = min((i for i, l in enumerate(loops) if l.reduce), default=n)
        # an unrolled loop may only hold unrolled or vectorized loops: the first slot from
        # which every loop inward is one of those
        tile_from = n
        while tile_from > 0 and loops[tile_from - 1].kind in ("unroll", "vectorize"):
            tile_from -= 1
        spatial_inside = [1] * (n + 1)  # product of spatial extents at positions >= i
        for i in range(n - 1, -1, -1):
            spatial_inside[i] = spatial_inside[i + 1] * (1 if loops[i].reduce else loops[i].extent)
        cached = {t for t, _ in nest.cache_reads}
        footprints = {t: info.footprints(t) for t in self.inputs if t not in cached}
        at = self.at
        reads = [(at["cache_read" + t], sizes) for t, sizes in footprints.items()]

        for i, l in enumerate(loops):
            serial = l.kind == "serial"
            free = serial and i < info.first_anchor   # structural steps may touch it
            if free and n < MAX_LOOPS and f"{l.name}_o" not in info.names and f"{l.name}_i" not in info.names:
                allowed[at["split"][i]] = factor_slots(l.extent)
            if i + 1 < n:
                m = loops[i + 1]
                both_free = free and m.kind == "serial" and i + 1 < info.first_anchor
                if both_free and n + 2 <= MAX_LOOPS and \
                        {f"{x}_{y}" for x in (l.name, m.name) for y in "oi"}.isdisjoint(info.names):
                    allowed[at["tile"][i]] = factor_slots(l.extent) & factor_slots(m.extent)
                if i + 1 < info.first_anchor and m.kind != "vectorize" and l.kind != "parallel" and \
                        (m.kind != "unroll" or l.kind == "unroll"):
                    allowed[at["swap"][i]] = True
                if both_free and l.reduce == m.reduce and f"{l.name}_{m.name}" not in info.names:
                    allowed[at["fuse"][i]] = True
            if serial:
                allowed[at["vectorize"][i]] = i == n - 1 and not l.reduce
                allowed[at["unroll"][i]] = (i + 1 >= tile_from and l.extent <= MAX_UNROLL
                                            and unrolled * l.extent <= MAX_UNROLLED_BODY)
                allowed[at["parallel"][i]] = i == 0 and not l.reduce and not has_parallel
            if nest.cache_write is None:
                allowed[at["cache_write"][i]] = first_reduce > i and 4 * spatial_inside[i + 1] <= MAX_LOCAL_BYTES
            for slots, sizes in reads:
                size = sizes[i + 1]
                allowed[slots[i]] = size is not None and 4 * size <= MAX_LOCAL_BYTES
        if last is not None and self.actions[last].primitive == "swap":
            allowed[last] = False
        return allowed

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
