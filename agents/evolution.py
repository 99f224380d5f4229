"""Evolutionary search guided by the cost model (Ansor's method), the default search.

A population of schedules is seeded from the proposal distribution (a trained
policy's samples, on a CPU beside sketches, ``agents/sketch.py``; where no policy is
given, sketches mixed with random rollouts), the expert schedule
and the best records already measured (a resumed run's tuning log). Each round it
evolves for a few generations: parents are drawn from the predicted best, children
are made by mutating one step's parameters (another split or tile factor, two loops
of a reorder swapped, a cache anchor moved, an unroll/vectorize toggled or moved,
another loop made parallel or bound, a split undone, a cache read dropped), by moving a
factor between two split or tile factors at constant product, or by crossing two
parents' step sequences.
Every child is replayed through the schedule IR and checked against the target's
rules: an illegal child is dropped, never measured. The cost model ranks the
population; each batch measures the predicted best of the fastest kernel's mutants
and of its neighbours with one annotation more (a local search around the incumbent;
while the incumbent holds, a second one around another structure), the population's
predicted best and a few random members, and the model learns from every batch. The
policy proposes; the search decides.
"""

from __future__ import annotations

import dataclasses
import json
from typing import Callable, Iterable, Iterator, Sequence

import numpy as np

from envs.actions import MAX_LOOPS
from kernels.codegen.rules import check_for_target
from kernels.ir.schedule import (Bind, CacheRead, CacheWrite, Fuse, Parallel, Reorder, Schedule, ScheduleError,
                                 Split, Step, Tensorize, Tile, Unroll, Vectorize, Warpgroup)
from kernels.target import Target

FACTORS = (2, 3, 4, 6, 8, 12, 16, 24, 32, 48, 64)   # split and tile factors a mutation draws from


def legal(op, steps: Sequence[Step], target: Target) -> Schedule | None:
    """The schedule ``steps`` build, if every step applies, the target's rules hold and the
    nest fits the observation (at most ``MAX_LOOPS`` loops, as for any env schedule)."""
    s = Schedule(op)
    try:
        for step in steps:
            s = s.apply(step)
        if s.steps:
            check_for_target(s, target)
    except ScheduleError:
        return None
    return s if len(s.nest.loops) <= MAX_LOOPS else None


def _factor(extent: int, current: int, lanes: int, rng: np.random.Generator) -> int | None:
    """Another factor for a loop of ``extent``, below it: a listed one, a multiple of the
    vector lanes (up to four vectors: a vectorized loop's width) or any divisor (no tail;
    large ones block a reduction or a parallel loop)."""
    options = {f for f in FACTORS} | {m * lanes for m in range(1, 5)} | \
              {d for d in range(2, extent // 2 + 1) if extent % d == 0}
    options = sorted(f for f in options if f < extent and f != current)
    return int(rng.choice(options)) if options else None


def mutate(schedule: Schedule, target: Target, rng: np.random.Generator, tries: int = 8) -> Schedule | None:
    """One step of ``schedule`` changed, or two of its factors moved (``_reshaped``), and
    at times one annotation added or dropped; None when no legal child came out of
    ``tries`` attempts."""
    steps = list(schedule.steps)
    if not steps:
        return None
    for _ in range(tries):
        if rng.random() < RESHAPE_RATE:
            child = _reshaped(steps, rng)
            if child is None:
                continue
        else:
            i = int(rng.integers(len(steps)))
            before = Schedule(schedule.op, tuple(steps[:i])).nest
            names = [l.name for l in before.loops]
            new = _mutate_step(steps[i], before, names, target.vector_lanes, rng)
            if new is _DROP:
                child = steps[:i] + steps[i + 1:]
            elif new is _UNSPLIT:
                child = _unsplit(steps, i)
            elif new is _UNFUSE:
                child = _unfused(steps, i)
            elif new is _WIDEN:
                child = _widened(steps, i, names)
            else:
                child = None if new is None else steps[:i] + [new] + steps[i + 1:]
            if child is None:
                continue
        if rng.random() < 0.2:   # also add an annotation on a loop of the final nest
            child = child + [_annotation(schedule.nest, target, rng)]
        s = legal(schedule.op, child, target)
        if s is not None and s.kernel_key() != schedule.kernel_key():
            return s
    return None


_DROP, _UNSPLIT, _UNFUSE, _WIDEN = object(), object(), object(), object()
RESHAPE_RATE = 0.25   # of mutations, the share that moves a factor between two split or tile factors
UNDO_RATE = 0.25      # of a split's or a cache read's mutations, the share that undoes it


def _unsplit(steps: list[Step], i: int) -> list[Step] | None:
    """``steps`` without the split ``steps[i]``: its outer loop takes the loop's name back,
    its inner loop leaves the reorders and its annotations go. The inverse of a split, which
    factor changes never reach: a register tile one row high instead of two, say (the
    strided 3x3 convolution 1,64,56,56,128 on this project's CPU: 2 rows x 4 columns to one
    row of 7, its input then read in place, 1.07x). None where a later step splits, tiles,
    fuses or binds either part or anchors a cache at the inner one (``legal`` drops any
    other step that still names them)."""
    loop = steps[i].loop
    outer, inner = f"{loop}_o", f"{loop}_i"
    out = list(steps[:i])
    for step in steps[i + 1:]:
        if isinstance(step, Reorder):
            out.append(Reorder(tuple(loop if l == outer else l for l in step.order if l != inner)))
        elif isinstance(step, (Unroll, Vectorize, Parallel)) and step.loop in (outer, inner):
            if step.loop == outer:
                out.append(dataclasses.replace(step, loop=loop))
        elif any(getattr(step, f, None) in (outer, inner) for f in ("loop", "outer", "inner")):
            if isinstance(step, (CacheWrite, CacheRead)) and step.loop == outer:
                out.append(dataclasses.replace(step, loop=loop))
            else:
                return None
        else:
            out.append(step)
    return out


def _renamed(step: Step, names: dict[str, str]) -> Step:
    """``step`` with its loops renamed by ``names`` (a reorder naming two that become one
    names it once)."""
    if isinstance(step, Reorder):
        return Reorder(tuple(dict.fromkeys(names.get(l, l) for l in step.order)))
    return dataclasses.replace(step, **{f: names[getattr(step, f)] for f in ("loop", "outer", "inner")
                                        if getattr(step, f, None) in names})


def _widened(steps: list[Step], i: int, names: list[str]) -> list[Step] | None:
    """``steps`` with the parallel loop ``steps[i]`` fused with the loop directly inside it
    (``names``: the nest's loops before it, outermost first), later steps naming the fused
    loop for either. A parallel loop of few iterations leaves cores idle at its end (the
    5x5 convolution 1,32,40,40,48 on this project's CPU: 3 blocks of 16 channels on 2
    cores; fused with the 20 row blocks, 1.10x); a sketch fuses until there are enough,
    an expert or a mutant need not."""
    outer = steps[i].loop
    at = names.index(outer) if outer in names else len(names)
    if at + 1 >= len(names):
        return None
    inner = names[at + 1]
    fused = f"{outer}_{inner}"
    return [*steps[:i], Fuse(outer, inner), Parallel(fused),
            *(_renamed(step, {outer: fused, inner: fused}) for step in steps[i + 1:])]


def _unfused(steps: list[Step], i: int) -> list[Step] | None:
    """``steps`` without the fuse ``steps[i]``, the inverse of ``_widened``: a parallel fused
    loop becomes its outer part, a cache anchored at it anchors at the inner part (one
    stage per iteration of both, as before), a reorder names both. None where a later step
    splits, fuses, binds or annotates the fused loop otherwise."""
    outer, inner = steps[i].outer, steps[i].inner
    fused = f"{outer}_{inner}"
    out = list(steps[:i])
    for step in steps[i + 1:]:
        if isinstance(step, Reorder):
            out.append(Reorder(tuple(l for x in step.order for l in ((outer, inner) if x == fused else (x,)))))
        elif isinstance(step, Parallel) and step.loop == fused:
            out.append(Parallel(outer))
        elif isinstance(step, (CacheRead, CacheWrite)) and step.loop == fused:
            out.append(dataclasses.replace(step, loop=inner))
        elif fused in (getattr(step, "loop", None), getattr(step, "outer", None), getattr(step, "inner", None)):
            return None
        else:
            out.append(step)
    return out


def _reshaped(steps: list[Step], rng: np.random.Generator) -> list[Step] | None:
    """``steps`` with one split or tile factor multiplied by 2 or 3 and another divided by
    it: a register tile keeps its size (its accumulators) and changes its shape, which one
    factor at a time reaches only through a tile too large or too small (the 1x1
    convolution 1,256,14,14,1024 on this project's CPU: 8 channels x 32 pixels to 16 x 16,
    1.10x). Ansor's tile-size mutation moves factors between the levels of one loop; this
    also moves them between loops. None where the factor does not divide."""
    slots = [(i, name) for i, step in enumerate(steps)
             for name in (("factor",) if isinstance(step, Split) else
                          ("outer_factor", "inner_factor") if isinstance(step, Tile) else ())]
    if len(slots) < 2:
        return None
    a, b = rng.choice(len(slots), 2, replace=False)
    (i, grow), (j, shrink), f = slots[a], slots[b], int(rng.choice((2, 3)))
    if getattr(steps[j], shrink) % f or getattr(steps[j], shrink) // f < 2:
        return None
    out = list(steps)
    out[i] = dataclasses.replace(out[i], **{grow: getattr(out[i], grow) * f})
    out[j] = dataclasses.replace(out[j], **{shrink: getattr(out[j], shrink) // f})
    return out


def _mutate_step(step: Step, nest, names: list[str], lanes: int, rng: np.random.Generator):
    """A changed copy of ``step`` as it applies to ``nest`` (the nest before it), ``_DROP``
    to remove it, ``_UNSPLIT`` or ``_UNFUSE`` to undo it (a split, a fuse), ``_WIDEN`` to
    fuse a parallel loop with the next, or None when this step has nothing to change."""
    extent = {l.name: l.extent for l in nest.loops}
    if isinstance(step, Split) and step.loop in extent:
        if rng.random() < UNDO_RATE:
            return _UNSPLIT
        f = _factor(extent[step.loop], step.factor, lanes, rng)
        return None if f is None else dataclasses.replace(step, factor=f)
    if isinstance(step, Tile) and step.outer in extent and step.inner in extent:
        if rng.random() < 0.5:
            f = _factor(extent[step.outer], step.outer_factor, lanes, rng)
            return None if f is None else dataclasses.replace(step, outer_factor=f)
        f = _factor(extent[step.inner], step.inner_factor, lanes, rng)
        return None if f is None else dataclasses.replace(step, inner_factor=f)
    if isinstance(step, Reorder) and len(step.order) >= 2:
        order = list(step.order)
        a, b = rng.choice(len(order), 2, replace=False)
        order[a], order[b] = order[b], order[a]
        return Reorder(tuple(order))
    if isinstance(step, CacheRead) and rng.random() < UNDO_RATE:   # read in place
        return _DROP
    if isinstance(step, Parallel) and rng.random() < 0.5:
        return _WIDEN
    if isinstance(step, (CacheWrite, CacheRead, Parallel, Bind)):   # the anchor or the loop moves
        return dataclasses.replace(step, loop=str(rng.choice(names)))
    if isinstance(step, (Unroll, Vectorize)):
        return _DROP if rng.random() < 0.5 else dataclasses.replace(step, loop=str(rng.choice(names)))
    if isinstance(step, Fuse):
        return _UNFUSE
    return None


def _annotations(target: Target) -> list[type]:
    return [Unroll, Vectorize] + ([Parallel] if target.kind == "cpu" else [])


def _annotation(nest, target: Target, rng: np.random.Generator) -> Step:
    loop = str(rng.choice([l.name for l in nest.loops]))
    kinds = _annotations(target)
    return kinds[int(rng.integers(len(kinds)))](loop)


def annotated(schedule: Schedule, target: Target) -> list[Schedule]:
    """Every legal schedule one annotation away from ``schedule`` (an unroll, a vectorize or,
    on a CPU, a parallel added on one loop of its nest). ``mutate`` adds one only beside
    another change, so the local search would meet these by chance; yet one unrolled loop
    alone can be the step that counts (the 7x7 convolution 1,512,7,7,512 on an H100: the
    incumbent's 16-channel stage loop unrolled, 0.079 -> 0.048 ms)."""
    out: dict[str, Schedule] = {}
    own = schedule.kernel_key()
    for loop in schedule.nest.loops:
        for kind in _annotations(target):
            s = legal(schedule.op, [*schedule.steps, kind(loop.name)], target)
            if s is not None and s.kernel_key() != own:
                out.setdefault(s.kernel_key(), s)
    return list(out.values())


def widened(schedule: Schedule, target: Target) -> list[Schedule]:
    """Every legal schedule that is ``schedule`` with one parallel loop fused with the loop
    inside it (``_widened``): how many iterations the cores share is the machine's (its core
    count), which an expert written for another, or a cost model trained on another, can
    misjudge."""
    out = []
    for i, step in enumerate(schedule.steps):
        if isinstance(step, Parallel):
            names = [l.name for l in Schedule(schedule.op, tuple(schedule.steps[:i])).nest.loops]
            child = _widened(list(schedule.steps), i, names)
            s = None if child is None else legal(schedule.op, child, target)
            if s is not None and s.kernel_key() != schedule.kernel_key():
                out.append(s)
    return out


def unstaged(schedule: Schedule, target: Target) -> list[Schedule]:
    """Every legal schedule that is ``schedule`` with one cache read dropped: the same loops
    reading that input in place, another structure (``structure``)."""
    out = []
    for i, step in enumerate(schedule.steps):
        if isinstance(step, CacheRead):
            s = legal(schedule.op, [*schedule.steps[:i], *schedule.steps[i + 1:]], target)
            if s is not None:
                out.append(s)
    return out


def crossover(a: Schedule, b: Schedule, target: Target, rng: np.random.Generator) -> Schedule | None:
    """A prefix of ``a``'s steps followed by a suffix of ``b``'s (one point each); None
    when the steps do not fit together."""
    if not a.steps or not b.steps:
        return None
    i = int(rng.integers(1, len(a.steps) + 1))
    j = int(rng.integers(0, len(b.steps)))
    s = legal(a.op, a.steps[:i] + b.steps[j:], target)
    return s if s is not None and s.kernel_key() not in (a.kernel_key(), b.kernel_key()) else None


def measured_seeds(search, k: int) -> list[Schedule]:
    """The ``k`` fastest correct schedules the measurer already holds for this operator
    (a resumed run's tuning log, or earlier measurements); not those of a batch still in
    flight, whose results land in the cache while a pipelined search proposes."""
    return [s for _, s in timed_seeds(search, k)]


def timed_seeds(search, k: int | None = None) -> Iterator[tuple[float, Schedule]]:
    """``measured_seeds`` with their times (ms), fastest first (all of them without ``k``),
    each replayed only when the caller reaches it."""
    op, t = search.op, search.target
    pending = {s.key() for s in search.pending.values()}
    found = []
    for key, res in list(search.measurer.cache.items()):
        kind, shape, schedule, target_kind, device, _, dtype = key
        if res.ok and schedule not in pending and kind == op.kind and tuple(shape) == op.shape \
                and target_kind == t.kind and device == t.device and dtype == op.dtype:
            found.append((res.time_ms, schedule))
    for time_ms, schedule in sorted(found, key=lambda x: x[0])[:k]:
        try:
            steps = json.loads(schedule)
            s = Schedule.from_json({"steps": steps}, search.op) if isinstance(steps, list) else None
        except (ValueError, ScheduleError):
            s = None
        if s is not None and len(s.nest.loops) <= MAX_LOOPS:   # what the cost model can see
            yield time_ms, s


def structure(schedule: Schedule) -> frozenset:
    """The stages a kernel has (which inputs it stages, whether it stages its output, whether
    it runs on tensor cores): its sketch, in Ansor's terms, which a change of factors, loop
    orders or annotations leaves alone."""
    return frozenset((type(step).__name__, getattr(step, "tensor", "")) for step in schedule.steps
                     if isinstance(step, (CacheRead, CacheWrite, Tensorize, Warpgroup)))


GAINED = 0.98        # an incumbent this much faster than the last that gained is progress; less is noise
RIVAL_WITHIN = 1.1   # a rival structure's best is at most this much slower than the incumbent


def rival(measured: Iterable[tuple[float, Schedule]]) -> Schedule | None:
    """Of ``measured`` (time, schedule; fastest first, the incumbent first of all), the
    fastest whose structure is not the incumbent's, where it comes within
    ``RIVAL_WITHIN`` of it: a structure far behind is no near tie that a model could have
    misjudged (a GPU convolution's kernels without a weight stage, 2-3x slower). Read no
    further than that bound."""
    measured = iter(measured)
    fastest, incumbent = next(measured, (None, None))
    if incumbent is None:
        return None
    own = structure(incumbent)
    for t, s in measured:
        if t > RIVAL_WITHIN * fastest:
            return None
        if structure(s) != own:
            return s
    return None


class Stall:
    """How many picks in a row the incumbent has held. One less than ``GAINED`` faster than
    the last that gained is noise, not progress: new incumbents 0.3-3% apart held the
    second local search off for five batches of the 1x1 stride-2 convolution
    1,256,28,28,512 on this project's CPU, where reading the input in place was 13% faster.
    The incumbent the search starts from (the expert's) counts as held from the first pick:
    nothing measured has challenged its structure yet."""

    def __init__(self) -> None:
        self.time_ms: float | None = None   # the incumbent's time when it last gained
        self.picks = 0

    def update(self, best_ms: float) -> int:
        """The picks held, with the incumbent now at ``best_ms``."""
        if self.time_ms is None:   # the incumbent from before the search: not yet challenged
            self.time_ms, self.picks = best_ms, 1
        elif best_ms > GAINED * self.time_ms:
            self.picks += 1
        else:
            self.time_ms, self.picks = best_ms, 0
        return self.picks


def evolve(population: list[Schedule], model, target: Target, rng: np.random.Generator,
           generations: int, size: int, crossover_rate: float = 0.3) -> list[Schedule]:
    """``generations`` rounds of children from the predicted best half; the population
    that comes out is the predicted best ``size`` of all seen, distinct."""
    pool = {s.kernel_key(): s for s in population}
    for _ in range(generations):
        ranked = _rank(list(pool.values()), model)
        parents = ranked[:max(2, len(ranked) // 2)]
        for _ in range(size):
            a = parents[int(rng.integers(len(parents)))]
            if rng.random() < crossover_rate and len(parents) > 1:
                child = crossover(a, parents[int(rng.integers(len(parents)))], target, rng)
            else:
                child = mutate(a, target, rng)
            if child is not None:
                pool.setdefault(child.kernel_key(), child)
        pool = {s.kernel_key(): s for s in _rank(list(pool.values()), model)[:size]}
    return list(pool.values())


def _rank(schedules: list[Schedule], model) -> list[Schedule]:
    """Predicted fastest first."""
    return [schedules[i] for i in model.rank(schedules)]


def search_evolve(search, rng: np.random.Generator, model, propose: Callable[[int], list[Schedule]],
                  population: int = 64, generations: int = 4, explore: int = 2,
                  local: int = 5, second: int = 2, fresh: int = 8) -> None:
    """Measure, round after round, the predicted best of an evolving population.

    ``propose(n)`` draws ``n`` new schedules (policy samples, or sketches and random rollouts): a whole
    population at the start, ``fresh`` more each round; the measured best join each round.
    Of each batch (``search.batch``), ``local`` are the predicted best of the fastest
    kernel's mutants and annotated neighbours (a local search around the incumbent, the
    expert's included), ``explore`` are random members of the population, and the rest its
    predicted best. The first batch's random picks go to the starting incumbent's
    ``annotated`` and ``widened`` neighbours: a model that has measured nothing near it yet
    ranks them among hundreds of mutants, and they are its cheapest tests.
    In the first batch, and once a batch has passed without an incumbent ``GAINED``
    faster (``Stall``), ``second`` of the ``local`` picks go to a second local search among
    other structures: the incumbent with one cache read dropped (``unstaged``) where no
    kernel of that structure was measured yet, and the neighbours of the fastest kernel of
    another structure (``rival``): a model that learnt mostly the incumbent's neighbours
    ranks another structure's poorly, and near its best member can lie what beats the
    incumbent. ARCHITECTURE.md ("Agents and training") gives the measurements behind each
    rule.
    """
    pop = propose(population)
    stall = Stall()

    def neighbours(parent: Schedule) -> list[Schedule]:
        """``parent``'s mutants and annotated neighbours, distinct."""
        found = [m for m in (mutate(parent, search.target, rng) for _ in range(4 * population)) if m]
        return list({m.kernel_key(): m for m in [*found, *annotated(parent, search.target)]}.values())

    def pick(n: int) -> list[Schedule]:
        nonlocal pop
        measured = list(timed_seeds(search))   # fastest first
        best = [s for _, s in measured[:population // 4]]
        pop = evolve([*pop, *best], model, search.target, rng, generations, population)
        picks: dict[str, Schedule] = {}

        def take(schedules: list[Schedule], k: int) -> None:
            for s in schedules:
                if len(picks) >= k:
                    return
                if not search.known(s):
                    picks.setdefault(s.kernel_key(), s)

        start = stall.time_ms is None   # the first pick: the incumbent is the one the search starts from
        if best:
            others: list[Schedule] = []
            if stall.update(measured[0][0]):   # a second local search: other structures
                seen = {structure(s) for _, s in measured}
                others = [s for s in unstaged(best[0], search.target) if structure(s) not in seen]
                other = rival(measured)
                if other is not None:
                    others += neighbours(other)
                others = [s for s in others if not search.known(s)]
            take(_rank(neighbours(best[0]), model), min(local, n) - (second if others else 0))
            take(_rank(list({s.kernel_key(): s for s in others}.values()), model), min(local, n))
        take(pop, max(n - explore, 1))
        if best and start:   # in place of the first batch's random picks
            take(_rank([*annotated(best[0], search.target), *widened(best[0], search.target)], model), n)
        rest = [s for s in pop if not search.known(s) and s.kernel_key() not in picks]
        take([rest[i] for i in rng.permutation(len(rest))], n)
        pop += propose(fresh)
        return list(picks.values())

    search.run(pick, lambda pairs: model.update([(s, r.time_ms / 1e3) for s, r in pairs if r.ok]), patience=20)
