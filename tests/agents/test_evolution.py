"""The evolutionary search: children stay legal, seeds are measured, resume replays."""

from __future__ import annotations

import zlib
from collections import Counter

import numpy as np
import pytest

from agents.evolution import (GAINED, RIVAL_WITHIN, Stall, _reshaped, _unfused, _unsplit, _widened, annotated,
                              crossover, legal, measured_seeds, mutate, rival, search_evolve, structure, timed_seeds,
                              unstaged, widened)
from agents.rollout import RandomDraw, rollout
from agents.search import AGENTS, P_DONE, Search
from envs.actions import ActionTable
from kernels.codegen import render
from kernels.codegen.rules import check_for_target
from kernels.ir.ops import make_op
from kernels.ir.schedule import (Bind, CacheRead, CacheWrite, Fuse, Parallel, Reorder, Schedule, Split, Tile, Unroll,
                                 Vectorize)
from kernels.measure import MeasureResult
from kernels.measure.tuning_log import measure_key
from kernels.target import cpu_target, cuda_target_for_compile

SHAPES = {"matmul": "24x40x16", "batch_matmul": "3x12x20x8", "dense_bias_relu": "20x36x12",
          "conv2d": "1,6,10,10,8,3,3,2,1", "depthwise_conv2d": "1,8,11,11,3,3,1,1"}
TARGETS = {"cpu": cpu_target(), "cuda": cuda_target_for_compile()}


@pytest.mark.parametrize("target", list(TARGETS))
@pytest.mark.parametrize("kind", list(SHAPES))
def test_mutation_and_crossover_keep_schedules_legal(kind, target):
    """Random parents, many children: every child replays, passes the target's rules and renders."""
    op, t = make_op(kind, SHAPES[kind]), TARGETS[target]
    table = ActionTable(op, t)
    rng = np.random.default_rng(0)
    parents = [rollout(op, table, RandomDraw(rng, p_done=P_DONE)).schedule for _ in range(12)]
    children = []
    for _ in range(60):
        a, b = parents[int(rng.integers(len(parents)))], parents[int(rng.integers(len(parents)))]
        child = mutate(a, t, rng) if rng.random() < 0.6 else crossover(a, b, t, rng)
        if child is not None:
            children.append(child)
    assert len(children) >= 15, "mutation and crossover should mostly succeed"
    for child in children:
        assert legal(op, child.steps, t) is not None
        check_for_target(child, t)
        render(child, t)


def test_a_reshaped_register_tile_keeps_its_size():
    """Moving a factor between two tile factors changes the tile's shape, not its number
    of elements: 8 x 32 becomes 16 x 16, 4 x 64 or another of the same product."""
    op = make_op("matmul", "64x64x64")
    parent = Schedule(op).tile("i", "j", 8, 32).reorder("i_o", "j_o", "k", "i_i", "j_i")
    rng, shapes = np.random.default_rng(0), set()
    for _ in range(40):
        steps = _reshaped(list(parent.steps), rng)
        if steps is not None:
            tile = next(s for s in steps if isinstance(s, Tile))
            shapes.add((tile.outer_factor, tile.inner_factor))
    assert shapes and all(a * b == 8 * 32 for a, b in shapes) and (16, 16) in shapes, shapes


def test_a_split_is_undone_and_a_cache_read_dropped():
    """The inverses of a split and of a cache read are mutations too: the convolution's
    2-row register tile becomes one row (its outer loop takes the name back, its inner loop
    and the annotations on it go), and the input comes to be read in place."""
    op = make_op("conv2d", "1,8,12,12,16,3,3,1,1")
    parent = legal(op, (Split("y", 2), Split("x", 4),
                        Reorder(("n", "k", "y_o", "x_o", "c", "ry", "rx", "y_i", "x_i")),
                        CacheWrite("x_o"), Vectorize("x_i"), Unroll("y_i"), CacheRead("I", "y_o")), cpu_target())
    assert parent is not None
    undone = _unsplit(list(parent.steps), 0)
    assert undone == [Split("x", 4), Reorder(("n", "k", "y", "x_o", "c", "ry", "rx", "x_i")),
                      CacheWrite("x_o"), Vectorize("x_i"), CacheRead("I", "y")]
    assert legal(op, undone, cpu_target()) is not None
    assert _unsplit([Split("y", 2), Split("y_i", 2)], 0) is None   # a later step splits a part
    rng, seen = np.random.default_rng(0), set()
    for _ in range(400):
        child = mutate(parent, cpu_target(), rng)
        if child is not None:
            splits = {s.loop for s in child.steps if isinstance(s, Split)}
            seen.add(("y" not in splits, not any(isinstance(s, CacheRead) for s in child.steps)))
    assert (True, False) in seen and (False, True) in seen, seen


def test_a_parallel_loop_is_widened_and_a_fuse_undone():
    """A parallel loop of 3 iterations (for 2 cores) fused with the row blocks inside it,
    the stages anchored at either then anchored at the fused loop; and the inverse, a
    fuse undone: the parallel loop its outer part, a stage at it anchored at the inner."""
    op, t = make_op("conv2d", "1,8,12,12,48,3,3,1,1"), cpu_target()
    parent = legal(op, (Split("k", 16), Split("y", 2), Reorder(("n", "k_o", "y_o", "x", "c", "ry", "rx", "y_i", "k_i")),
                        CacheWrite("x"), Vectorize("k_i"), Fuse("n", "k_o"), Parallel("n_k_o"),
                        CacheRead("W", "n_k_o"), CacheRead("I", "y_o")), t)
    assert parent is not None
    steps = list(parent.steps)
    wide = _widened(steps, 6, ["n_k_o", "y_o", "x", "c", "ry", "rx", "y_i", "k_i"])
    assert wide == [*steps[:6], Fuse("n_k_o", "y_o"), Parallel("n_k_o_y_o"),
                    CacheRead("W", "n_k_o_y_o"), CacheRead("I", "n_k_o_y_o")]
    assert legal(op, wide, t) is not None
    assert _widened(steps, 6, ["k_i"]) is None                       # nothing inside to fuse with
    narrow = _unfused(wide, 6)
    assert narrow == [*steps[:6], Parallel("n_k_o"), CacheRead("W", "y_o"), CacheRead("I", "y_o")]
    assert legal(op, narrow, t) is not None
    assert _unfused([Fuse("n", "k"), Split("n_k", 2)], 0) is None     # a later step splits the fused loop
    rng, fuses = np.random.default_rng(0), set()
    for _ in range(400):
        child = mutate(parent, t, rng)
        if child is not None:
            fuses.add(sum(isinstance(s, Fuse) for s in child.steps))
    assert {0, 2} <= fuses, fuses


def test_an_incumbent_holds_until_it_gains_more_than_noise():
    """The incumbent the search starts from counts as held from the first batch."""
    stall = Stall()
    assert [stall.update(ms) for ms in (1.0, 0.995, 0.99, 0.985 * GAINED, 0.98, 0.9, 0.9)] == [1, 2, 3, 0, 1, 0, 1]


def test_annotated_neighbours_add_one_annotation_each():
    """The local search's annotated neighbours: each the parent's steps plus one unroll or
    vectorize (on a CPU also a parallel), legal, all distinct; on a GPU convolution the
    channel loop of the shared stage unrolled is among them."""
    op, t = make_op("conv2d", "1,16,7,7,32,3,3,1,1"), cuda_target_for_compile()
    parent = legal(op, (Split("k", 8), Split("c", 8), Reorder(("n", "k_o", "y", "x", "k_i", "c_o", "c_i", "ry", "rx")),
                        Bind("n", "blockIdx.z"), Bind("k_o", "blockIdx.y"), Bind("y", "blockIdx.x"),
                        Bind("x", "threadIdx.y"), Bind("k_i", "threadIdx.x"), CacheWrite("k_i"),
                        Unroll("rx"), Unroll("ry"), CacheRead("I", "c_o")), t)
    assert parent is not None
    neighbours = annotated(parent, t)
    assert neighbours and len({n.kernel_key() for n in neighbours}) == len(neighbours)
    for n in neighbours:
        assert n.steps[:-1] == parent.steps and isinstance(n.steps[-1], (Unroll, Vectorize))
        assert legal(op, n.steps, t) is not None
    assert Unroll("c_i") in [n.steps[-1] for n in neighbours]
    cpu = legal(make_op("matmul", "64x64x64"), (Split("j", 16), Reorder(("i", "j_o", "k", "j_i"))), cpu_target())
    assert {n.steps[-1] for n in annotated(cpu, cpu_target())} == {Parallel("i"), Unroll("j_i"), Vectorize("j_i")}


def _staged(op):
    """A CPU matmul schedule staging both inputs and its output."""
    return legal(op, (Split("j", 16), Reorder(("i", "j_o", "k", "j_i")), CacheRead("A", "j_o"), CacheRead("B", "i"),
                      CacheWrite("j_o")), cpu_target())


def test_unstaged_variants_drop_one_cache_read_each():
    op = make_op("matmul", "32x32x32")
    parent = _staged(op)
    variants = unstaged(parent, cpu_target())
    assert [[s for s in v.steps if isinstance(s, CacheRead)] for v in variants] == [[CacheRead("B", "i")],
                                                                                  [CacheRead("A", "j_o")]]
    assert all(v.steps[:2] == parent.steps[:2] and CacheWrite("j_o") in v.steps for v in variants)
    assert {structure(v) for v in variants} == {frozenset({("CacheRead", "B"), ("CacheWrite", "")}),
                                                frozenset({("CacheRead", "A"), ("CacheWrite", "")})}
    assert unstaged(legal(op, (Split("j", 16),), cpu_target()), cpu_target()) == []


def test_a_rival_is_another_structure_near_the_incumbent():
    op = make_op("matmul", "32x32x32")
    incumbent = _staged(op)
    same = legal(op, (*incumbent.steps, Unroll("j_i")), cpu_target())      # another kernel, same structure
    other = unstaged(incumbent, cpu_target())[0]
    assert structure(same) == structure(incumbent) != structure(other)
    assert rival([(1.0, incumbent), (1.01, same), (1.05, other)]) is other
    assert rival([(1.0, incumbent), (1.01, same), (RIVAL_WITHIN * 1.01, other)]) is None
    assert rival([]) is None


class _ByStages:
    """A stand-in cost model that predicts a kernel with more steps faster (it never ranks a
    dropped stage first)."""

    def rank(self, schedules, k=None):
        return [int(i) for i in np.argsort([-len(s.steps) for s in schedules], kind="stable")[:k]]

    def update(self, pairs):
        pass


def test_a_held_incumbent_gets_its_unstaged_variants_measured():
    """The second local search: the incumbent the search starts from (the expert's place)
    has its variants with an input read in place measured in the first batch, though the
    model ranks them last."""
    op = make_op("matmul", "32x32x32")
    incumbent = _staged(op)
    fast = incumbent.kernel_key()

    class Measurer(_FakeMeasurer):
        def time_of(self, s):
            return 1.0 if s.kernel_key() == fast else 2.0

    measurer = Measurer(cpu_target())
    search = Search(op, cpu_target(), measurer, budget=9)   # the incumbent and one batch of 8
    search.measure([incumbent])
    search_evolve(search, np.random.default_rng(0), _ByStages(), lambda n: [incumbent][:n])
    assert search.best.kernel_key() == fast
    assert all(v.kernel_key() in search.measured for v in unstaged(incumbent, cpu_target()))


def test_the_starting_incumbents_annotated_and_widened_neighbours_are_measured_first():
    """The first batch's random picks measure the one-annotation neighbours of the kernel
    the search starts from and its parallel loop widened (here one each), though the model
    ranks them behind its mutants."""
    op = make_op("matmul", "64x64x64")
    start = legal(op, (Split("j", 16), Reorder(("i", "j_o", "k", "j_i")), Vectorize("j_i"), Parallel("i")),
                  cpu_target())
    first = [*annotated(start, cpu_target()), *widened(start, cpu_target())]
    assert [s.steps[-1] for s in first] == [Unroll("k"), Parallel("i_j_o")]
    search = Search(op, cpu_target(), _FakeMeasurer(cpu_target()), budget=9)   # the start and one batch of 8
    search.measure([start])
    search_evolve(search, np.random.default_rng(0), _Model(), lambda n: [start][:n])
    assert all(s.kernel_key() in search.measured for s in first)


def test_a_structure_measured_once_is_left_to_the_rival_rule():
    """Dropping a stage is tried once per structure: an incumbent that moves by noise does
    not bring its slow in-place variants back batch after batch."""
    op = make_op("matmul", "32x32x32")
    incumbent = _staged(op)
    own = structure(incumbent)

    class Measurer(_FakeMeasurer):
        def time_of(self, s):   # the staged kernels within 1% of each other; the rest 3x slower
            if structure(s) != own:
                return 3.0
            key = s.kernel_key()
            return 1.01 if key == incumbent.kernel_key() else 1.0 + zlib.crc32(key.encode()) % 100 / 1e4

    search = Search(op, cpu_target(), Measurer(cpu_target()), budget=64)
    search.measure([incumbent])
    search_evolve(search, np.random.default_rng(0), _ByStages(), lambda n: [incumbent][:n], explore=0)
    assert search.best.kernel_key() != incumbent.kernel_key()    # the incumbent moved
    slow = Counter(structure(s) for _, s in timed_seeds(search) if structure(s) != own)
    assert set(slow) == {structure(v) for v in unstaged(incumbent, cpu_target())}
    assert max(slow.values()) == 1, slow


def test_an_illegal_child_is_dropped():
    op = make_op("matmul", "16x16x16")
    s = legal(op, (), cpu_target())
    assert s is not None and not s.steps
    assert legal(op, (Split("i", 4), Unroll("nope")), cpu_target()) is None


class _FakeMeasurer:
    """Times are a function of the schedule, nothing is compiled; a cache like the real one."""

    def __init__(self, target):
        self.target = target
        self.cache = {}

    def measure(self, schedules, slow_cutoff_s=None):
        out = []
        for s in schedules:
            render(s, self.target)
            key = measure_key(s.op.kind, s.op.shape, s.steps_json(), self.target.kind, self.target.device,
                              self.target.compiler)
            t = self.time_of(s)
            self.cache.setdefault(key, MeasureResult(True, t, (t,), s.op.flops / t / 1e6, True, None))
            out.append(self.cache[key])
        return out

    def time_of(self, s):
        return 0.1 + zlib.crc32(s.key().encode()) % 1000 / 100


@pytest.fixture
def fake_measurer():
    return _FakeMeasurer(cpu_target())


class _Model:
    """A stand-in cost model: fewer steps predicted faster; records what it learns."""

    def __init__(self):
        self.updates = 0

    def predict(self, schedules):
        return np.array([-len(s.steps) for s in schedules], dtype=float)

    def rank(self, schedules, k=None):
        return [int(i) for i in np.argsort(self.predict(schedules), kind="stable")[:k]]

    def update(self, pairs):
        self.updates += len(pairs)


def test_evolve_spends_the_budget_on_distinct_legal_schedules(fake_measurer):
    op = make_op("matmul", "32x32x32")
    model = _Model()
    search = Search(op, cpu_target(), fake_measurer, budget=20)
    AGENTS["evolve"](search, np.random.default_rng(0), model=model)
    assert len(search.measured) == 20 and model.updates > 0
    assert len(set(search.measured)) == 20


def test_measured_seeds_come_from_the_measurers_cache(fake_measurer):
    op = make_op("matmul", "32x32x32")
    search = Search(op, cpu_target(), fake_measurer, budget=6)
    AGENTS["random"](search, np.random.default_rng(1))
    again = Search(op, cpu_target(), fake_measurer, budget=6)
    seeds = measured_seeds(again, 3)
    times = sorted(r.time_ms for r in search.measured.values() if r.ok)[:3]
    assert [r.time_ms for r in fake_measurer.measure(seeds)] == times
