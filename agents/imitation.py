"""Behaviour cloning of the expert schedules, so PPO starts from a sensible policy.

Each train shape's expert schedule (``kernels.experts``) is replayed as environment
actions, with the observations and masks the environment would show; the policy is
trained to pick those actions. From chance, a few thousand PPO steps found little.
"""

from __future__ import annotations

import logging

import numpy as np

from envs.actions import ActionTable
from kernels.experts import expert_schedule
from kernels.ir.ops import make_op
from kernels.ir.schedule import ScheduleError

from .rollout import ReplayDraw, rollout

logger = logging.getLogger(__name__)


def expert_demonstrations(op_kind: str, shapes: list[str], target, max_steps: int, dtype: str = "fp32"):
    """(observations, masks, actions) of each shape's expert schedule replayed as actions."""
    decisions = []
    for shape in shapes:
        op = make_op(op_kind, shape, dtype)
        table = ActionTable(op, target)
        try:
            replay = table.actions_for(expert_schedule(op, target))
        except ScheduleError as e:
            logger.warning("imitation: the expert schedule of %s %s has no action sequence (%s); skipped",
                           op_kind, shape, e)
            continue
        decisions += rollout(op, table, ReplayDraw(replay), max_steps, observe=True).decisions
    return (np.array([d.observation for d in decisions]), np.array([d.mask for d in decisions]),
            np.array([d.action for d in decisions]))


def imitate(agent, demos, epochs: int, seed: int) -> float:
    """Behaviour cloning of the demonstrations into ``agent.policy``; returns the final
    greedy accuracy."""
    import torch

    obs, masks, actions = (torch.as_tensor(x) for x in demos)
    policy = agent.policy
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    torch.manual_seed(seed)
    for _ in range(epochs):
        _, log_prob, _ = policy.evaluate_actions(obs, actions, action_masks=masks)
        loss = -log_prob.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
    with torch.no_grad():
        dist = policy.get_distribution(obs, action_masks=masks.numpy())
        return float((dist.get_actions(deterministic=True) == actions).float().mean())
