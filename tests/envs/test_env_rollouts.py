"""Any action sequence the mask allows ends in a kernel that computes the reference."""

from __future__ import annotations

import json

import numpy as np
import pytest
from hypothesis import HealthCheck, Phase, given, settings
from hypothesis import strategies as st

from envs.actions import Action
from envs.schedule_env import ScheduleEnv
from experiments.shapes import family
from kernels.ir.expr import Lin

from rollout_helpers import OPS, random_episode

# Shrinking would re-measure a kernel per attempt; a failure prints the schedule instead.
@settings(max_examples=40, derandomize=True, deadline=None, database=None,
          phases=(Phase.explicit, Phase.generate), suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(OPS), data=st.data(), seed=st.integers(0, 2**32 - 1),
       p_done=st.floats(0.0, 0.25))
def test_random_masked_rollouts_compute_the_reference(op, data, seed, p_done, make_env):
    shape = data.draw(st.sampled_from(family(op, "small")), label="shape")
    env = make_env(op, shape=shape)
    rewards, info, steps = random_episode(env, np.random.default_rng(seed), p_done=p_done, seed=0)
    assert all(allowed for _, allowed, _, _ in steps)
    assert info["correct"] and "error" not in info, (
        f"{op} {shape}: {info.get('error')}\nsteps: {json.dumps(info['schedule'])}\n{env.schedule}")


@pytest.mark.parametrize("kind", ["div", "mod"])
def test_divmod_of_a_sum_prints_with_parentheses(kind):
    """The printed expression, read with C precedence (Python's // and % bind like C's
    / and %), must evaluate to the expression's value."""
    arg = Lin.var("a", 2) + Lin.var("b")
    e = arg.floordiv(6) if kind == "div" else arg.mod(6)
    printed = str(e)
    expected = (2 * 1 + 5) // 6 if kind == "div" else (2 * 1 + 5) % 6
    assert eval(printed.replace("/", "//"), {"a": 1, "b": 5}) == expected, printed


@pytest.mark.parametrize("op, shape, fuse_slot", [
    ("matmul", "16x16x16", 0),               # fuse i, j
    ("conv2d", "1,4,8,8,8,3,3,1,1", 2),      # loops n, k, y, x, ...: fuse y, x
])
def test_split_of_a_fused_loop_is_correct(op, shape, fuse_slot, isolated_measurer):
    env = ScheduleEnv(op=op, shape=shape, measurer=isolated_measurer)
    env.reset(seed=0)
    actions = [Action("fuse", fuse_slot), Action("split", fuse_slot, 0)]
    for a in actions:
        i = env.table.index[a]
        assert env.action_masks()[i], a
        *_, info = env.step(i)
        assert "error" not in info
    *_, info = env.step(env.table.done)
    assert info["correct"] and "error" not in info, info.get("error")
