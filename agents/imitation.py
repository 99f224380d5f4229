"""Behaviour cloning of the expert schedules, so PPO starts from a sensible policy.

Each train shape's expert schedule (``kernels.experts``) is replayed as environment
actions, with the observations and masks the environment would show; the policy is
trained to pick those actions. From chance, a few thousand PPO steps found little.
"""

from __future__ import annotations

import logging

import numpy as np

from envs.actions import ActionTable, NestInfo
from envs.features import featurize
from kernels.experts import expert_schedule
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule, ScheduleError

logger = logging.getLogger(__name__)


def expert_demonstrations(op_kind: str, shapes: list[str], target, max_steps: int):
    """(observations, masks, actions) of each shape's expert schedule replayed as actions."""
    obs, masks, actions = [], [], []
    for shape in shapes:
        op = make_op(op_kind, shape)
        table = ActionTable(op, target)
        s = Schedule(op)
        last = None
        try:
            replay = table.actions_for(expert_schedule(op, target))
        except ScheduleError as e:
            logger.warning("imitation: the expert schedule of %s %s has no action sequence (%s); skipped",
                           op_kind, shape, e)
            continue
        for step, a in enumerate(replay[:max_steps]):
            info = NestInfo(op, s.nest)
            mask = table.mask(info, last, steps_left=max_steps - step)
            if not mask[a]:
                break
            obs.append(featurize(op, info, target, step / max_steps))
            masks.append(mask)
            actions.append(a)
            if a != table.done:
                s = s.apply(table.to_step(a, s.nest))
                last = a
    return np.array(obs), np.array(masks), np.array(actions)


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
