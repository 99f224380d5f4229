"""Reward modes are classes chosen by name; a new one plugs into the env."""

from __future__ import annotations

import math

import pytest

from envs.actions import Action
from envs.reward import FAILED_SLOWDOWN, REWARDS, Reward, make_reward
from envs.schedule_env import ScheduleEnv


def test_modes_by_name():
    assert set(REWARDS) == {"measure", "measure_vs_expert", "surrogate", "measure_every_step"}
    assert all(make_reward(name).name == name for name in REWARDS)
    with pytest.raises(ValueError, match="unknown reward mode 'speed'; use one of measure, measure_vs_expert, surrogate"):
        make_reward("speed")


def test_measure_every_step_by_name_or_by_flag(fake_measurer_cls):
    steps = [Action("split", 1, 2), Action("swap", 0), Action("vectorize", 3)]
    runs = []
    for kw in (dict(reward="measure_every_step"), dict(reward="measure", measure_every_step=True)):
        env = ScheduleEnv(op="matmul", shape="16x16x16", measurer=fake_measurer_cls(), **kw)
        env.reset(seed=0)
        assert env.reward.name == "measure_every_step"
        runs.append([env.step(env.table.index[a])[1] for a in steps] + [env.step(env.table.done)[1]])
    assert runs[0] == runs[1] and runs[0][0] != 0.0


class HalfEachStep(Reward):
    """A made-up mode: every step halves the time."""

    name = "halves"

    def estimate(self, env, schedule):
        return self.t_prev / 2


def test_a_new_mode_is_one_class(fake_measurer_cls, monkeypatch):
    monkeypatch.setitem(REWARDS, HalfEachStep.name, HalfEachStep)
    for fail in (False, True):
        env = ScheduleEnv(op="matmul", shape="16x16x16", reward="halves", measurer=fake_measurer_cls(fail=fail))
        env.reset(seed=0)
        rewards = [env.step(env.table.index[Action("swap", s)])[1] for s in (0, 1)]
        assert rewards == [math.log(2)] * 2
        _, last, terminated, _, info = env.step(env.table.done)
        total = sum(rewards) + last
        if fail:   # reward_on_error: the failed kernel counts as FAILED_SLOWDOWN x naive
            assert math.isclose(total, -math.log(FAILED_SLOWDOWN)) and "error" in info
        else:
            assert math.isclose(total, math.log(info["speedup"]))


def test_measure_vs_expert_returns_the_log_speedup_over_the_expert(fake_measurer_cls):
    """The return is log(T_expert / T): the unscheduled kernel, the final one here, scores
    below zero by exactly how much slower than the expert's kernel it is."""
    from kernels.experts import expert_schedule

    measurer = fake_measurer_cls(naive_ms=40.0)
    env = ScheduleEnv(op="matmul", shape="64x64x64", reward="measure_vs_expert", measurer=measurer)
    env.reset(seed=0)
    t_expert = measurer.time_ms(expert_schedule(env.op, env.target).key())
    _, reward, terminated, _, info = env.step(env.table.done)
    assert terminated and math.isclose(reward, math.log(t_expert / 40.0))
    assert math.isclose(env.expert_seconds(), t_expert / 1e3)
    assert measurer.paired_with == {env.op.shape_str: expert_schedule(env.op, env.target).key()}


def test_measure_vs_expert_times_each_kernel_beside_the_expert(isolated_measurer):
    """On a CPU the final kernels are timed in turn with the expert's, in its units."""
    from kernels.ir.schedule import Schedule

    env = ScheduleEnv(op="matmul", shape="32x32x24", reward="measure_vs_expert", measurer=isolated_measurer)
    env.reset(seed=0)
    assert isolated_measurer.paired(env.op)
    res = env.measure(Schedule(env.op).split("i", 4))
    assert res.ok and len(res.rival_times_ms) == len(res.times_ms) >= 1
