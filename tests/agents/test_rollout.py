"""Rollouts: the environment's episodes, drawn by a random, trained or replaying policy."""

from __future__ import annotations


import numpy as np
import pytest

from agents.rollout import RandomDraw, ReplayDraw, random_schedules, rollout
from envs import MAX_STEPS
from envs.actions import ActionTable, NestInfo
from envs.schedule_env import ScheduleEnv
from kernels.experts import expert_schedule
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule
from kernels.measure import MeasureResult
from kernels.target import cpu_target, cuda_target_for_compile

GPU = cuda_target_for_compile("sm_90")


class FakeMeasurer:
    """Every kernel takes 1 ms; nothing is compiled."""

    measured = 0

    def measure_one(self, schedule, slow_cutoff_s=None):
        return MeasureResult(True, 1.0, (1.0,), 1.0, True, None)


@pytest.mark.parametrize("target", [cpu_target(), GPU], ids=["cpu", "cuda"])
def test_random_schedules_are_legal_distinct_and_seeded(target):
    op = make_op("conv2d", "1,4,8,8,8,3,3,1,1")
    a = random_schedules(op, 20, np.random.default_rng(3), max_steps=6, target=target)
    b = random_schedules(op, 20, np.random.default_rng(3), max_steps=6, target=target)
    assert [s.key() for s in a] == [s.key() for s in b]
    assert len({s.key() for s in a}) == len(a) == 20
    assert all(len(s.steps) <= 5 for s in a)   # six actions at most, the last one done
    table = ActionTable(op, target)
    for s in a:   # replays through the mask: every step was an allowed action
        replay = Schedule(op)
        for step in s.steps:
            allowed = [table.to_step(i, replay.nest) for i in np.flatnonzero(table.mask(NestInfo(op, replay.nest)))
                       if i != table.done]
            assert step in allowed
            replay = replay.apply(step)
    with pytest.raises(ValueError, match="sampling"):
        random_schedules(op, 1, np.random.default_rng(0), by="nope")


@pytest.mark.parametrize("by, p_done", [("action", None), ("primitive", None), ("action", 0.05)])
def test_a_rollout_is_an_episode_of_the_env(by, p_done):
    """Each drawn action was drawn on the observation and mask the env shows at that step."""
    op = make_op("matmul", "16x24x8")
    table = ActionTable(op)
    rng = np.random.default_rng(5)
    for _ in range(4):
        r = rollout(op, table, RandomDraw(rng, by, p_done), max_steps=12, observe=True)
        assert len(r.actions) <= 11
        env = ScheduleEnv(op="matmul", shape="16x24x8", max_steps=12, measurer=FakeMeasurer())
        obs, _ = env.reset(seed=0)
        for d in r.decisions:
            assert np.array_equal(obs, d.observation) and np.array_equal(env.action_masks(), d.mask)
            obs, _, terminated, truncated, info = env.step(d.action)
            assert "error" not in info
        assert env.schedule.key() == r.schedule.key()
        assert [d.action for d in r.decisions if d.action != table.done] == r.actions


def test_the_mask_ends_a_rollout_at_max_steps():
    op = make_op("matmul", "64x64x64")
    table = ActionTable(op)
    never_done = RandomDraw(np.random.default_rng(0), p_done=0.0)
    assert len(rollout(op, table, never_done, max_steps=5).actions) == 4
    assert len(rollout(op, table, never_done).actions) <= MAX_STEPS - 1


def test_a_prefix_is_kept():
    op = make_op("matmul", "64x64x64")
    table = ActionTable(op)
    first = rollout(op, table, RandomDraw(np.random.default_rng(1), p_done=0.0), max_steps=8)
    again = rollout(op, table, RandomDraw(np.random.default_rng(2)), prefix=first.actions[:3])
    assert again.actions[:3] == first.actions[:3]


@pytest.mark.parametrize("target", [cpu_target(), GPU], ids=["cpu", "cuda"])
def test_replay_rebuilds_the_expert_and_stops_at_a_masked_action(target):
    op = make_op("matmul", "64x48x32")
    table = ActionTable(op, target)
    expert = expert_schedule(op, target)
    actions = table.actions_for(expert)
    r = rollout(op, table, ReplayDraw(actions), observe=True)
    assert r.schedule.nest == expert.nest
    assert [d.action for d in r.decisions] == actions      # done included
    two = rollout(op, table, ReplayDraw(actions[:2]))     # the replay ends: the rollout too
    assert two.actions == actions[:2]
    forbidden = int(np.flatnonzero(~table.mask(NestInfo(op, two.schedule.nest), actions[1], MAX_STEPS - 2))[0])
    cut = rollout(op, table, ReplayDraw(actions[:2] + [forbidden] + actions[2:]), observe=True)
    assert cut.actions == actions[:2] and len(cut.decisions) == 2
