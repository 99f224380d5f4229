"""Random masked rollouts shared by the environment tests."""

from __future__ import annotations

from typing import Callable

import numpy as np

from kernels.ir.ops import OPERATORS

OPS = tuple(OPERATORS)

def random_episode(env, rng: np.random.Generator, p_done: float = 0.1, p_forbidden: float = 0.0,
                   check: Callable | None = None, **reset_kw):
    """One episode: at each step ``done`` with probability ``p_done``, else (with
    probability ``p_forbidden``) an action the mask forbids, else an action chosen
    uniformly among those it allows (done included). ``check(obs, reward, info)`` runs
    after the reset and every step. Returns (rewards, final info, [(action, allowed,
    reward, info)] per step)."""
    env = env.unwrapped
    obs, info = env.reset(**reset_kw)
    if check:
        check(obs, 0.0, info)
    rewards, steps = [], []
    while True:
        mask = env.action_masks()
        if rng.random() < p_done:
            a = env.table.done
        elif rng.random() < p_forbidden and (~mask).any():
            a = int(rng.choice(np.flatnonzero(~mask)))
        else:
            a = int(rng.choice(np.flatnonzero(mask)))
        obs, reward, terminated, truncated, info = env.step(a)
        rewards.append(reward)
        steps.append((a, bool(mask[a]), reward, info))
        if check:
            check(obs, reward, info)
        if terminated or truncated:
            return rewards, info, steps
