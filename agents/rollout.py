"""How a schedule is sampled: one rollout of the environment's actions, with the drawing
policy as a parameter.

A rollout shows the drawing policy what an episode of ``ScheduleEnv`` would: the mask
of :class:`~envs.actions.ActionTable` on the table's target, with the previous action
and the steps left (at most ``max_steps`` actions, the final ``done`` included, so a
schedule has at most ``max_steps - 1`` steps), and the observation when the policy
needs one. The rollout ends when the policy draws ``done`` or stops. Drawing policies:

- :class:`RandomDraw`: uniform among the allowed actions (``by="action"``, ``done``
  included: what a random policy does; splits and tiles then outnumber everything
  else, since a matmul's initial nest allows ~60 actions and ``vectorize`` at most
  one), or a primitive first, then one of its actions (``by="primitive"``, so
  annotations such as vectorize, parallel, unroll and caches appear as often as
  structure). With ``p_done``, ``done`` is drawn with that probability wherever it
  is allowed, and is otherwise never drawn (the random search's candidates).
- :class:`PolicyDraw`: a trained policy (``predict(obs, action_masks=,
  deterministic=)``, MaskablePPO's), greedy or sampled; not asked on the last step,
  where the mask allows only ``done``.
- :class:`ReplayDraw`: given actions, e.g. an expert schedule's
  (``ActionTable.actions_for``), until one is not allowed.

With ``observe=True`` the rollout also returns each drawn action with the observation
and mask it was drawn on (imitation learns from these). Every random choice comes from
the generator the policy was given, so a seeded rollout is reproducible.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Protocol, Sequence

import numpy as np

from envs import MAX_STEPS
from envs.actions import ActionTable, NestInfo
from envs.features import featurize
from kernels.ir.ops import Operator
from kernels.ir.schedule import Schedule
from kernels.target import Target

SAMPLING = ("action", "primitive")


class Draw(Protocol):
    """A drawing policy: the next action on ``mask`` (``table.done`` ends the rollout), or
    None to stop without it, at ``step`` (actions so far) with ``steps_left`` (this one
    included). ``observation`` is None unless ``observes``."""

    observes: bool

    def __call__(self, table: ActionTable, mask: np.ndarray, observation: np.ndarray | None,
                 step: int, steps_left: int) -> int | None: ...


@dataclass(frozen=True)
class Decision:
    observation: np.ndarray
    mask: np.ndarray
    action: int


@dataclass
class Rollout:
    schedule: Schedule
    actions: list[int]                      # the actions applied (a final done is not one)
    decisions: list[Decision] | None = None  # with observe=True: every drawn action, done included


class RandomDraw:
    """Random actions from ``rng``: see the module doc for ``by`` and ``p_done``."""

    observes = False

    def __init__(self, rng: np.random.Generator, by: str = "action", p_done: float | None = None):
        if by not in SAMPLING:
            raise ValueError(f"unknown sampling {by!r}; use one of {', '.join(SAMPLING)}")
        self.rng, self.by, self.p_done = rng, by, p_done

    def __call__(self, table: ActionTable, mask: np.ndarray, observation, step: int, steps_left: int) -> int:
        allowed = np.flatnonzero(mask)
        if self.p_done is not None:
            others = allowed[allowed != table.done]
            if not len(others) or (mask[table.done] and self.rng.random() < self.p_done):
                return table.done
            allowed = others
        if self.by == "primitive":
            prims = sorted({table.actions[a].primitive for a in allowed})
            prim = prims[self.rng.integers(len(prims))]
            allowed = [a for a in allowed if table.actions[a].primitive == prim]
        return int(allowed[self.rng.integers(len(allowed))])


class PolicyDraw:
    """A trained policy's actions, greedy (``deterministic``) or sampled (with torch's
    generator: seed it for a reproducible rollout)."""

    observes = True

    def __init__(self, policy, deterministic: bool):
        self.policy, self.deterministic = policy, deterministic

    def __call__(self, table: ActionTable, mask: np.ndarray, observation: np.ndarray, step: int,
                 steps_left: int) -> int:
        if steps_left <= 1:   # the mask allows only done
            return table.done
        import torch

        threads = torch.get_num_threads()
        torch.set_num_threads(1)   # one small observation: a thread team costs more than it gives
        try:
            a, _ = self.policy.predict(observation, action_masks=mask, deterministic=self.deterministic)
        finally:
            torch.set_num_threads(threads)
        return int(a)


class ReplayDraw:
    """The given actions in turn; stops at the first one the mask forbids, or at their end."""

    observes = False

    def __init__(self, actions: Sequence[int]):
        self.actions = list(actions)

    def __call__(self, table: ActionTable, mask: np.ndarray, observation, step: int,
                 steps_left: int) -> int | None:
        if step >= len(self.actions) or not mask[self.actions[step]]:
            return None
        return self.actions[step]


def allowed(table: ActionTable, info: NestInfo, actions: Sequence[int], max_steps: int = MAX_STEPS) -> np.ndarray:
    """The environment's mask on ``info``'s nest after ``actions`` (the episode so far)."""
    return table.mask(info, actions[-1] if actions else None, steps_left=max_steps - len(actions))


def rollout(op: Operator, table: ActionTable, draw: Draw, max_steps: int = MAX_STEPS, prefix: Sequence[int] = (),
            observe: bool = False) -> Rollout:
    """One schedule of ``op``: ``prefix`` replayed, then actions from ``draw`` until it
    draws ``done`` or stops (or the mask allows nothing)."""
    s = Schedule(op)
    actions: list[int] = []
    for a in prefix:
        s = s.apply(table.to_step(a, s.nest))
        actions.append(a)
    decisions: list[Decision] | None = [] if observe else None
    target: Target = table.target
    while True:
        step = len(actions)
        info = NestInfo(op, s.nest)
        mask = allowed(table, info, actions, max_steps)
        if not mask.any():
            break
        obs = featurize(op, info, target, step / max_steps) if observe or draw.observes else None
        a = draw(table, mask, obs, step, max_steps - step)
        if a is None:
            break
        if decisions is not None:
            decisions.append(Decision(obs, mask, a))
        if a == table.done:
            break
        s = s.apply(table.to_step(a, s.nest))
        actions.append(a)
    return Rollout(s, actions, decisions)


def random_schedules(op: Operator, n: int, rng: np.random.Generator, max_steps: int = MAX_STEPS,
                     by: str = "action", unique: bool = True, max_tries: int | None = None,
                     target: Target | None = None) -> list[Schedule]:
    """``n`` random rollouts' schedules of ``op`` on ``target`` (default: this CPU), drawn
    ``by`` action or primitive with ``done`` among the actions (see the module doc);
    distinct by steps when ``unique`` (fewer only when ``max_tries`` rollouts, default
    ``20 * n``, do not find that many)."""
    table = ActionTable(op, target)
    draw = RandomDraw(rng, by)
    out: list[Schedule] = []
    seen: set[str] = set()
    for _ in range(max_tries if max_tries is not None else 20 * n):
        if len(out) >= n:
            break
        s = rollout(op, table, draw, max_steps).schedule
        if unique:
            k = s.key()
            if k in seen:
                continue
            seen.add(k)
        out.append(s)
    return out
