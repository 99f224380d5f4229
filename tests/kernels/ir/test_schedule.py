"""The schedule IR: JSON round trips, immutability, and the legality of each step."""

from __future__ import annotations

import dataclasses
import json
import re

import pytest

from kernels.experts import expert_schedule
from kernels.ir.printer import print_loop_nest
from kernels.ir.ops import OPERATORS, make_op
from kernels.codegen import render
from kernels.ir.schedule import (MAX_LOCAL_BYTES, MAX_UNROLL, MAX_UNROLLED_BODY, CacheRead,
                              CacheWrite, Fuse, Parallel, Reorder, Schedule, ScheduleError,
                              Split, Step, Tile, Unroll, Vectorize)
from kernels.target import cpu_target

MM = make_op("matmul", "16x16x16")

# Every primitive, some twice; whether a step is legal somewhere does not matter to JSON.
PRIMITIVES = [
    Split("i", 4),
    Split("k", 5),                      # non-divisible
    Reorder(("k", "i")),
    Reorder(("j", "k", "i")),
    Tile("i", "j", 4, 8),
    Fuse("i", "j"),
    Vectorize("k"),
    Unroll("k"),
    Parallel("i"),
    CacheWrite("i"),
    CacheRead("A", "i"),
]


def _example_of(cls: type) -> Step:
    """An instance of any step class, its fields filled by type (for kinds added later)."""
    sample = {"str": "i", "int": 3, "bool": True}
    kwargs = {}
    for f in dataclasses.fields(cls):
        t = f.type if isinstance(f.type, str) else getattr(f.type, "__name__", str(f.type))
        kwargs[f.name] = ("i", "j") if t.startswith("tuple") else sample[t]
    return cls(**kwargs)


def test_primitives_cover_the_cpu_step_kinds():
    cpu = {"Split", "Reorder", "Tile", "Fuse", "Vectorize", "Unroll", "Parallel", "CacheWrite", "CacheRead"}
    assert {type(s).__name__ for s in PRIMITIVES} == cpu
    assert cpu <= set(Step.registry)


ROUND_TRIP_STEPS = PRIMITIVES + [_example_of(cls) for cls in Step.registry.values()]


@pytest.mark.parametrize("step", ROUND_TRIP_STEPS, ids=str)
def test_step_json_round_trip(step):
    d = step.to_json()
    assert d["step"] == type(step).__name__
    text = json.dumps(d)                      # plain JSON: lists, strings, ints
    back = Step.from_json(json.loads(text))
    assert back == step
    assert type(back) is type(step)
    assert hash(back) == hash(step)
    assert back.to_json() == d


def test_reorder_json_keeps_a_tuple():
    back = Step.from_json(json.loads(json.dumps(Reorder(("k", "j", "i")).to_json())))
    assert back.order == ("k", "j", "i") and isinstance(back.order, tuple)


def _every_primitive(op=MM) -> Schedule:
    """One schedule using every primitive (the tail of k non-divisible)."""
    return (Schedule(op)
            .split("k", 5)                                  # k_o (4), k_i (5): a tail
            .tile("i", "j", 4, 8)                           # i_o j_o i_i j_i k_o k_i
            .reorder("i_o", "j_o", "k_o", "k_i", "i_i", "j_i")
            .fuse("i_o", "j_o")
            .cache_write("i_o_j_o")
            .vectorize("j_i")
            .unroll("i_i")
            .parallel("i_o_j_o")
            .cache_read("B", "k_o")
            .cache_read("A", "i_o_j_o"))


def _round_trip_cases():
    cases = [("every-primitive", _every_primitive())]
    regular = {"matmul": "64x64x64", "dense_bias_relu": "13x7x5", "batch_matmul": "3x7x16x5",
               "conv2d": "1,3,7,7,5,3,3,2,1", "depthwise_conv2d": "2,3,9,9,3,3,1,1",
               "conv2d_bias_relu": "1,3,7,7,5,3,3,1,1"}
    for kind in OPERATORS:
        cases.append((f"expert-{kind}", expert_schedule(make_op(kind, regular[kind]), cpu_target())))
    return cases


ROUND_TRIP = _round_trip_cases()


@pytest.mark.parametrize("schedule", [c[1] for c in ROUND_TRIP], ids=[c[0] for c in ROUND_TRIP])
def test_schedule_json_round_trip(schedule, target):
    d = json.loads(json.dumps(schedule.to_json()))
    assert d["op"] == schedule.op.kind and d["shape"] == schedule.op.shape_str
    back = Schedule.from_json(d)
    assert back.steps == schedule.steps
    assert back.op == schedule.op
    assert back.key() == schedule.key()
    assert back.nest == schedule.nest
    assert render(back, target).source == render(schedule, target).source
    # with the operator given instead of rebuilt from the JSON
    again = Schedule.from_json({"steps": d["steps"]}, schedule.op)
    assert render(again, target).source == render(schedule, target).source


def test_every_primitive_schedule_runs_correctly(assert_correct):
    assert_correct(_every_primitive())


def test_key_is_canonical_and_distinguishes_schedules():
    a, b = Schedule(MM).split("i", 4), Schedule(MM).split("i", 4)
    assert a.key() == b.key() and a == b
    assert a.key() != Schedule(MM).split("i", 8).key()
    assert Schedule(MM).key() == "[]"


# ---------------------------------------------------------------- immutability

def test_apply_returns_a_new_schedule_and_leaves_the_old_one():
    base = Schedule(MM)
    loops_before = base.nest.loops
    s1 = base.split("i", 4)
    s2 = s1.reorder("k", "i_i")
    assert base.steps == () and base.nest.loops == loops_before
    assert [l.name for l in base.nest.loops] == ["i", "j", "k"]
    assert s1.steps == (Split("i", 4),)
    assert [l.name for l in s1.nest.loops] == ["i_o", "i_i", "j", "k"]
    assert s2.steps == (Split("i", 4), Reorder(("k", "i_i")))
    assert [l.name for l in s2.nest.loops] == ["i_o", "k", "j", "i_i"]
    assert s1 is not base and s2 is not s1
    # two branches from one parent do not see each other
    s3 = s1.split("j", 2)
    assert s1.steps == (Split("i", 4),) and len(s2.steps) == 2 and len(s3.steps) == 2


def test_failed_step_leaves_the_schedule_unchanged():
    s = Schedule(MM).split("i", 4)
    key, nest = s.key(), s.nest
    with pytest.raises(ScheduleError):
        s.split("nope", 2)
    assert s.key() == key and s.nest == nest


def test_schedule_and_steps_are_frozen():
    s = Schedule(MM).split("i", 4)
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps = ()
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.steps[0].factor = 2
    with pytest.raises(dataclasses.FrozenInstanceError):
        s.nest.loops[0].kind = "parallel"
    assert isinstance(s.steps, tuple)


def test_nest_is_the_replay_of_the_steps():
    s = _every_primitive()
    assert Schedule(s.op, s.steps).nest == s.nest


# ---------------------------------------------------------------- illegal steps

def _sched(*steps, op=MM) -> Schedule:
    s = Schedule(op)
    for step in steps:
        s = s.apply(step)
    return s


BIG = make_op("matmul", "1024x1024x1024")

ILLEGAL = [
    # (id, schedule, step, reason fragment)
    ("split-unknown-loop", _sched(), Split("zz", 2), "no loop named 'zz'"),
    ("reorder-unknown-loop", _sched(), Reorder(("i", "zz")), "no loop named 'zz'"),
    ("tile-unknown-loop", _sched(), Tile("i", "zz", 2, 2), "no loop named 'zz'"),
    ("fuse-unknown-loop", _sched(), Fuse("zz", "j"), "no loop named 'zz'"),
    ("vectorize-unknown-loop", _sched(), Vectorize("zz"), "no loop named 'zz'"),
    ("unroll-unknown-loop", _sched(), Unroll("zz"), "no loop named 'zz'"),
    ("parallel-unknown-loop", _sched(), Parallel("zz"), "no loop named 'zz'"),
    ("cache-write-unknown-loop", _sched(), CacheWrite("zz"), "no loop named 'zz'"),
    ("cache-read-unknown-loop", _sched(), CacheRead("A", "zz"), "no loop named 'zz'"),
    ("split-after-split-old-name", _sched(Split("i", 4)), Split("i", 2), "no loop named 'i'"),
    ("split-factor-0", _sched(), Split("i", 0), "factor must be an integer in [1, 16]"),
    ("split-factor-negative", _sched(), Split("i", -2), "factor must be an integer in [1, 16]"),
    ("split-factor-too-large", _sched(), Split("i", 17), "factor must be an integer in [1, 16]"),
    ("split-factor-not-int", _sched(), Split("i", 2.5), "factor must be an integer"),
    ("split-factor-bool", _sched(), Split("i", True), "factor must be an integer"),
    ("tile-factor-0", _sched(), Tile("i", "j", 0, 4), "factor must be an integer in [1, 16]"),
    ("tile-factor-too-large", _sched(), Tile("i", "j", 4, 32), "factor must be an integer in [1, 16]"),
    ("tile-same-loop", _sched(), Tile("i", "i", 2, 2), "outer and inner are the same loop"),
    ("tile-wrong-order", _sched(), Tile("j", "i", 2, 2), "'j' is not outside 'i'"),
    ("reorder-loop-twice", _sched(), Reorder(("i", "j", "i")), "a loop is named twice"),
    ("fuse-not-adjacent", _sched(), Fuse("i", "k"), "'k' is not directly inside 'i'"),
    ("fuse-wrong-order", _sched(), Fuse("j", "i"), "'i' is not directly inside 'j'"),
    ("fuse-spatial-with-reduce", _sched(), Fuse("j", "k"), "cannot fuse a spatial loop with a reduce loop"),
    ("fuse-cache-anchor", _sched(CacheWrite("j")), Fuse("i", "j"), "may not anchor a cache stage"),
    ("split-cache-anchor", _sched(CacheRead("A", "i")), Split("i", 2), "anchors a cache stage"),
    ("vectorize-reduce-loop", _sched(), Vectorize("k"), "only a spatial loop can be vectorized"),
    ("vectorize-not-innermost", _sched(), Vectorize("i"), "vectorized loop 'i' must stay innermost"),
    ("vectorize-not-innermost-after-reorder", _sched(Reorder(("k", "j"))), Vectorize("i"),
     "vectorized loop 'i' must stay innermost"),
    ("reorder-moves-vectorized-loop", _sched(Reorder(("k", "j")), Vectorize("j")), Reorder(("j", "i")),
     "vectorized loop 'j' must stay innermost"),
    ("split-vectorized-loop", _sched(Reorder(("k", "j")), Vectorize("j")), Split("j", 4),
     "loop 'j' is already marked vectorize"),
    ("vectorize-twice", _sched(Reorder(("k", "j")), Vectorize("j")), Vectorize("j"),
     "already marked vectorize"),
    ("unroll-beyond-limit", _sched(op=make_op("matmul", f"{MAX_UNROLL + 1}x4x4")), Unroll("i"),
     f"extent {MAX_UNROLL + 1} exceeds the unroll limit {MAX_UNROLL}"),
    ("unroll-body-too-large", _sched(Unroll("k"), Unroll("j")), Unroll("i"),
     f"4096 copies of the body (limit {MAX_UNROLLED_BODY})"),
    ("unroll-around-a-rolled-loop", _sched(), Unroll("j"), "would contain the rolled loop(s) k"),
    ("two-parallel-loops", _sched(Parallel("i")), Parallel("j"), "a loop is already parallel"),
    ("parallel-twice-same-loop", _sched(Parallel("i")), Parallel("i"), "already parallel"),
    ("parallel-reduce-loop", _sched(), Parallel("k"), "a reduce loop cannot run in parallel"),
    ("unroll-parallel-loop", _sched(Parallel("i")), Unroll("i"), "already marked parallel"),
    ("cache-write-reduce-outside", _sched(Reorder(("k", "i"))), CacheWrite("i"),
     "reduce loop(s) k lie outside the cache_write loop 'i'"),
    ("cache-write-at-reduce-loop", _sched(), CacheWrite("k"), "reduce loop(s) k lie outside"),
    ("cache-write-split-reduce-outside", _sched(Split("k", 4), Reorder(("k_o", "j"))), CacheWrite("j"),
     "reduce loop(s) k_o lie outside"),
    ("reorder-moves-reduce-out-of-cache-write", _sched(CacheWrite("j")), Reorder(("k", "j")),
     "reduce loop(s) k lie outside the cache_write loop 'j'"),
    ("cache-write-twice", _sched(CacheWrite("i")), CacheWrite("j"), "the output is already cached"),
    ("cache-write-tile-too-large", _sched(Split("i", 512), op=make_op("matmul", "1024x1024x4")),
     CacheWrite("i_o"), f"cache_write tile of 2097152 bytes exceeds {MAX_LOCAL_BYTES}"),
    ("cache-read-output", _sched(), CacheRead("C", "i"), "'C' is not an"),
    ("cache-read-unknown-tensor", _sched(), CacheRead("Z", "i"), "'Z' is not an"),
    ("cache-read-twice", _sched(CacheRead("A", "i")), CacheRead("A", "j"), "'A' is already cached"),
    ("cache-read-too-large", _sched(op=BIG), CacheRead("B", "i"),
     f"cache_read buffer for 'B' at 'i' is 4194304 bytes (limit {MAX_LOCAL_BYTES})"),
    ("cache-read-through-twice-fused-loop", _sched(Fuse("b", "i"), Fuse("b_i", "j"), Reorder(("k", "b_i_j")),
                                                   op=make_op("batch_matmul", "2x4x6x8")),
     CacheRead("A", "k"), "indexed through a fused loop inside 'k'"),
]


@pytest.mark.parametrize("schedule,step,reason", [c[1:] for c in ILLEGAL], ids=[c[0] for c in ILLEGAL])
def test_illegal_step_names_step_and_reason(schedule, step, reason):
    with pytest.raises(ScheduleError) as info:
        schedule.apply(step)
    msg = str(info.value)
    assert msg.startswith(str(step) + ":"), msg
    assert reason in msg, msg


@pytest.mark.parametrize("schedule,step,reason", [c[1:] for c in ILLEGAL], ids=[c[0] for c in ILLEGAL])
def test_illegal_step_is_rejected_when_replayed_from_json(schedule, step, reason):
    d = {**schedule.to_json(), "steps": schedule.steps_json() + [step.to_json()]}
    with pytest.raises(ScheduleError, match=re.escape(f"{step}: ")):
        Schedule.from_json(json.loads(json.dumps(d)))


def test_schedule_error_is_a_value_error():
    assert issubclass(ScheduleError, ValueError)


def test_apply_of_a_non_step():
    with pytest.raises(ScheduleError, match="is not a schedule step"):
        Schedule(MM).apply("split i 4")


def test_step_from_json_unknown_step_name():
    with pytest.raises(ScheduleError, match="unknown step"):
        Step.from_json({"step": "Bogus", "loop": "i"})
    with pytest.raises(ScheduleError, match="unknown step"):
        Step.from_json({"loop": "i"})                      # no step name at all


def test_step_from_json_unknown_step_names_it():
    with pytest.raises(ScheduleError, match="Bogus"):
        Step.from_json({"step": "Bogus", "loop": "i"})


def test_step_from_json_bad_fields():
    with pytest.raises(ScheduleError, match="bad fields for Split"):
        Step.from_json({"step": "Split", "loop": "i"})               # factor missing
    with pytest.raises(ScheduleError, match="bad fields for Vectorize"):
        Step.from_json({"step": "Vectorize", "loop": "i", "lanes": 8})


def test_step_from_json_not_an_object():
    with pytest.raises(ScheduleError):
        Step.from_json(1)


def test_reorder_with_non_list_order_from_json():
    with pytest.raises(ScheduleError):
        Schedule.from_json({"op": "matmul", "shape": "4x4x4",
                            "steps": [{"step": "Reorder", "order": 5}]})


def test_split_factor_given_as_string_from_json():
    with pytest.raises(ScheduleError, match="factor must be an integer"):
        Schedule.from_json({"op": "matmul", "shape": "4x4x4",
                            "steps": [{"step": "Split", "loop": "i", "factor": "2"}]})


def test_cache_read_of_bias_is_rejected_or_honoured():
    """The bias is read only in the epilogue: caching it must not be accepted and then ignored."""
    op = make_op("dense_bias_relu", "8x8x8")
    try:
        s = Schedule(op).cache_read("bias", "i")
    except ScheduleError:
        return
    assert "bias_local" in print_loop_nest(s)


def test_every_legal_primitive_on_the_printed_nest():
    text = print_loop_nest(_every_primitive())
    assert "# parallel" in text and "# unroll" in text and "# vectorize" in text
    assert "local C_local" in text and "local B_local" in text and "local A_local" in text


def test_simplified_keeps_the_kernel_in_fewer_steps():
    """Runs of reorders collapse into one that names only the loops they moved, or into
    none where they cancel."""
    op = make_op("matmul", "64x64x64")
    s = Schedule(op).split("i", 8).reorder("i_o", "k", "i_i", "j").parallel("i_o")
    head = (Split("i", 8), Reorder(("k", "i_i", "j")), Parallel("i_o"))   # i_o stayed first
    assert s.reorder("j", "k").reorder("k", "j").vectorize("j").simplified().steps == head + (Vectorize("j"),)
    swapped = s.reorder("j", "i_i").reorder("j", "k").reorder("k", "j").vectorize("i_i")
    simple = swapped.simplified()
    assert simple.steps == head + (Reorder(("j", "i_i")), Vectorize("i_i"))
    assert simple.kernel_key() == swapped.kernel_key()
    assert Schedule(op).simplified() == Schedule(op)


def test_loops_of_extent_one_do_not_tell_kernels_apart():
    """A loop of extent 1 runs once wherever it stands: kernels that differ only in where
    such loops stand or how they are annotated share a key; one that anchors a cache stage
    still counts where it stands, and every other loop as ever."""
    op = make_op("conv2d", "1,8,12,12,16,3,3,1,1")
    inner = Schedule(op).split("k", 8).reorder("k_o", "n", "y", "x", "k_i", "c", "ry", "rx")
    outer = Schedule(op).split("k", 8).reorder("n", "k_o", "y", "x", "k_i", "c", "ry", "rx")
    assert inner.kernel_key() == outer.kernel_key() == outer.parallel("n").kernel_key()
    assert inner.parallel("k_o").kernel_key() != inner.kernel_key()
    assert inner.reorder("x", "y").kernel_key() != inner.kernel_key()
    assert inner.cache_read("I", "n").kernel_key() != outer.cache_read("I", "n").kernel_key()


def test_a_replayed_schedule_builds_its_own_operators_nest():
    """Nests are remembered by step sequence, per operator: the same steps on two shapes
    build two nests, a sequence built afresh equals the remembered one, and an illegal
    step still raises however often its prefix was built."""
    a, b = make_op("matmul", "64x64x64"), make_op("matmul", "32x48x16")
    steps = Schedule(a).split("i", 8).split("j", 16).reorder("i_o", "j_o", "i_i", "k", "j_i").steps
    for _ in range(2):
        na, nb = Schedule(a, steps).nest, Schedule(b, steps).nest
        assert [l.extent for l in na.loops] == [8, 4, 8, 64, 16]
        assert [l.extent for l in nb.loops] == [4, 3, 8, 16, 16]
    fresh = Schedule(a)
    for s in steps:
        fresh = fresh.apply(s)
    assert fresh.nest == Schedule(a, steps).nest
    for _ in range(2):
        with pytest.raises(ScheduleError):
            Schedule(a, steps).split("nowhere", 2)


def test_a_long_schedule_replays_without_recursion():
    """A schedule of many steps (a file can hold any number) builds its nest step by step."""
    op = make_op("matmul", "64x64x64")
    steps = (Reorder(("j", "i")), Reorder(("i", "j"))) * 1500
    assert Schedule(op, steps).nest.loops == Schedule(op).nest.loops
