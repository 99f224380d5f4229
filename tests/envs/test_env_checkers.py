"""The standard environment checkers of Gymnasium and Stable-Baselines3, on every op kind.

Random actions from the checkers are fine: an action the mask forbids is a no-op
with reward 0 and ``info["error"]``.
"""

from __future__ import annotations

import warnings

import gymnasium
import numpy as np
import pytest
from gymnasium.utils.env_checker import check_env as gym_check_env
from stable_baselines3.common.env_checker import check_env as sb3_check_env

import envs
from envs.schedule_env import ScheduleEnv
from experiments.shapes import family
from kernels.ir.ops import OPERATORS

OPS = tuple(OPERATORS)


def small_shape(op: str) -> str:
    return family(op, "small")[0]


@pytest.mark.parametrize("op", OPS)
def test_gymnasium_check_env(op, make_env):
    gym_check_env(make_env(op, shape=small_shape(op)), skip_render_check=True)


def test_step_returns_a_fresh_observation(make_env):
    env = make_env("matmul", shape="16x16x16")
    obs0, _ = env.reset(seed=0)
    forbidden = int(np.flatnonzero(~env.action_masks())[0])
    obs1, reward, *_, info = env.step(forbidden)
    assert reward == 0.0 and "error" in info
    assert not np.shares_memory(obs0, obs1), "step returned the same array as reset"


@pytest.mark.parametrize("op", OPS)
def test_sb3_check_env(op, make_env):
    env = make_env(op, shape=small_shape(op))
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the checker reports problems as warnings
        sb3_check_env(env, warn=True)


def test_registered_env(env_measurer):
    env = gymnasium.make(envs.ENV_ID, op="matmul", shape="16x16x16", measurer=env_measurer)
    assert isinstance(env.unwrapped, ScheduleEnv)
    obs, info = env.reset(seed=0)
    assert info["shape"] == "16x16x16"
    assert env.observation_space.contains(obs)
    sb3_check_env(env)
    _, _, terminated, truncated, info = env.step(env.unwrapped.table.done)
    assert terminated and not truncated and info["correct"]
