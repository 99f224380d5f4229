"""Imitation teaches whole schedules: every expert a shipped policy imitates replays within
an episode, and the greedy policy of a finished imitation rebuilds its teachers."""

from __future__ import annotations

import json

import numpy as np
import pytest

from agents.imitation import demonstrations, experts, imitate, replay
from envs import MAX_STEPS
from experiments.pretrained import ROOT
from experiments.shapes import family
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule
from kernels.target import cpu_target, cuda_target_for_compile

SHIPPED = sorted(ROOT.glob("*/*-ppo.json"))


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_every_expert_of_a_shipped_policy_replays_within_an_episode(spec):
    meta = json.loads(spec.read_text())
    kind, dtype = meta["op"], "bf16" if "-bf16-" in spec.name else "fp16" if "-fp16-" in spec.name else "fp32"
    target = cpu_target() if meta["target"] == "cpu" else cuda_target_for_compile()
    for shape in meta["shapes"] + family(kind, "held_out"):
        schedule = experts(kind, [shape], target, dtype)[shape]
        assert replay(make_op(kind, shape, dtype), schedule, target, MAX_STEPS) is not None, \
            f"the {meta['target']} {dtype} expert of {kind} {shape} is cut short or has no action sequence"


def test_a_schedule_outside_the_action_table_has_no_replay():
    op = make_op("matmul", "64x64x64")
    assert replay(op, Schedule(op).split("i", 5), cpu_target(), MAX_STEPS) is None   # 5: no factor slot
    expert = experts("matmul", ["64x64x64"], cpu_target())["64x64x64"]
    assert replay(op, expert, cpu_target(), 3) is None   # cut short


def test_imitation_stops_once_greedy_rebuilds_every_teacher(tmp_path):
    from agents.policy import new_agent
    from envs.schedule_env import ScheduleEnv
    from kernels.measure import Builder, Measurer

    measurer = Measurer(cpu_target(), builder=Builder(cache_dir=tmp_path))
    agent = new_agent(ScheduleEnv(op="matmul", shape="16x24x8", measurer=measurer), dict(n_steps=8, batch_size=8))
    shapes = ["64x64x64", "128x64x32"]
    demos = demonstrations("matmul", experts("matmul", shapes, cpu_target()), cpu_target(), MAX_STEPS)
    assert len(demos[2]) and np.all(demos[1][np.arange(len(demos[2])), demos[2]])   # each action allowed
    assert imitate(agent, demos, epochs=3000, seed=0) == 1.0


def test_a_searched_teacher_replays_and_beats_the_expert(tmp_path):
    """Whatever the search finds, a teacher is the expert or a kernel that the env's actions
    rebuild and that beat the expert by the margin when timed beside it."""
    from agents.imitation import MARGIN, search_teachers
    from agents.cost_model import LearnedCostModel
    from kernels.measure import Builder, Measurer

    target = cpu_target()
    with Measurer(target, builder=Builder(cache_dir=tmp_path), log=tmp_path / "log.jsonl") as measurer:
        found = search_teachers("matmul", ["24x40x16"], target, measurer, LearnedCostModel(target=target), None,
                                budget=4, seed=0, rounds=1)
        assert measurer.measured <= 4 + 1   # the budget and the expert (contenders are re-timed, not logged)
    assert set(found) == {"24x40x16"}
    for shape, (teacher, speedup) in found.items():
        op = make_op("matmul", shape)
        expert = experts("matmul", [shape], target)[shape]
        assert teacher.key() == expert.key() or speedup >= MARGIN
        assert replay(op, teacher, target, MAX_STEPS) is not None


@pytest.mark.parametrize("kind", ["matmul", "dense_bias_relu", "batch_matmul", "conv2d", "depthwise_conv2d"])
def test_the_many_family_draws_distinct_valid_shapes_none_held_out(kind):
    """The same shapes on every machine (seeded), each a valid operator, none held out or
    twice, and the default train split kept."""
    from experiments.shapes import _drawn

    train = family(kind, "train", "many")
    assert len(train) == len(set(train)) == len(family(kind, "train")) + 60
    assert train[:len(family(kind, "train"))] == family(kind, "train")
    assert not set(train) & set(family(kind, "held_out"))
    for shape in train:
        make_op(kind, shape)
    assert _drawn(kind, 5, 1, set()) == _drawn(kind, 5, 1, set())
