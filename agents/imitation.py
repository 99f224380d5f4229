"""Behaviour cloning of teacher schedules, so PPO starts from a sensible policy.

The teacher of a train shape is its expert schedule (``kernels.experts``) or, with a
teacher search, the fastest kernel an evolutionary search measured on that shape where
it beats the expert (expert iteration: the policy learns what the search found, then
proposes for the next search). Of the kernels about that fast, the one whose actions stray
least from the expert's teaches: a greedy rollout on a new shape combines the decisions of
many teachers, and a decision that one teacher changed without gain is noise there. Each
teacher is replayed as environment actions, with the observations and masks the
environment would show; the policy is trained to pick those actions. From chance, a few
thousand PPO steps found little.
"""

from __future__ import annotations

import difflib
import logging
from typing import Callable, Iterator

import numpy as np

from envs import MAX_STEPS
from envs.actions import ActionTable
from kernels.codegen import render
from kernels.experts import expert_schedule
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule, ScheduleError
from kernels.measure.comparison import speedups_over

from .rollout import ReplayDraw, rollout

logger = logging.getLogger(__name__)

MARGIN = 1.03   # a searched kernel teaches only where it beats the expert by this much, timed alternately
NEAR_BEST = 0.97   # of the kernels within this fraction of the best speedup, the nearest to the expert teaches


def replay(op, schedule: Schedule, target, max_steps: int, observe: bool = False):
    """The rollout of ``schedule``'s env actions, or None where the actions cannot rebuild it
    (a factor outside the action table, a step the mask refuses, too many actions)."""
    table = ActionTable(op, target)
    try:
        actions = table.actions_for(schedule)
    except ScheduleError:
        return None
    r = rollout(op, table, ReplayDraw(actions), max_steps, observe=observe)
    if r.schedule.nest == schedule.nest:
        return r
    try:   # a rollout cut short may be no kernel at all (on a GPU: nothing bound yet)
        return r if render(r.schedule, target).source == render(schedule, target).source else None
    except ScheduleError:
        return None


def demonstrations(op_kind: str, teachers: dict[str, Schedule], target, max_steps: int, dtype: str = "fp32"):
    """(observations, masks, actions) of each shape's teacher schedule replayed as actions."""
    decisions = []
    for shape, schedule in teachers.items():
        r = replay(make_op(op_kind, shape, dtype), schedule, target, max_steps, observe=True)
        if r is None:
            logger.warning("imitation: the teacher of %s %s has no action sequence; skipped", op_kind, shape)
            continue
        decisions += r.decisions
    return (np.array([d.observation for d in decisions]), np.array([d.mask for d in decisions]),
            np.array([d.action for d in decisions]))


def experts(op_kind: str, shapes: list[str], target, dtype: str = "fp32") -> dict[str, Schedule]:
    """Each shape's expert schedule: the default teachers."""
    return {shape: expert_schedule(make_op(op_kind, shape, dtype), target) for shape in shapes}


def search_teachers(op_kind: str, shapes: list[str], target, measurer, model, policy, budget: int, seed: int,
                    max_steps: int = MAX_STEPS, dtype: str = "fp32", rounds: int = 3, contenders: int = 4,
                    on_progress: Callable | None = None, skip: frozenset[str] = frozenset()
                    ) -> Iterator[tuple[str, Schedule, float]]:
    """Each shape's teacher and its speedup over the expert, shape by shape (an interrupted
    run keeps the teachers found so far). An evolutionary search of
    ``budget`` measurements (proposals from ``policy``) runs; of the kernels it timed faster
    than the expert that the env's actions rebuild, ``contenders`` (the fastest half, the
    rest those whose actions stray least from the expert's) are timed again beside the
    expert in ``rounds`` alternating rounds. Where one beats the expert by ``MARGIN``, the
    nearest to the expert of those within ``NEAR_BEST`` of the best speedup teaches; else
    the expert does. The re-timing matters: the fastest of many noisy timings is timed too
    kindly. Shapes in ``skip`` (searched by an earlier, interrupted run) are passed over;
    the others draw the seeds they would have drawn. A shape whose search fails (logged)
    keeps its expert."""
    for i, shape in enumerate(shapes):
        if shape in skip:
            continue
        op = make_op(op_kind, shape, dtype)
        try:
            teacher, speedup = _search_teacher(op, target, measurer, model, policy, budget, seed + i, max_steps,
                                               rounds, contenders, on_progress)
        except Exception as e:   # noqa: BLE001 - one shape's failure must not end a run of hours
            logger.warning("teacher search of %s %s failed (%s: %s); its expert teaches", op_kind, shape,
                           type(e).__name__, e)
            teacher, speedup = expert_schedule(op, target), 1.0
        yield shape, teacher, speedup


def _search_teacher(op, target, measurer, model, policy, budget: int, seed: int, max_steps: int, rounds: int,
                    contenders: int, on_progress: Callable | None) -> tuple[Schedule, float]:
    """One shape's teacher and its speedup (``search_teachers``)."""
    from .evolution import measured_seeds
    from .search import AGENTS, Search

    expert = expert_schedule(op, target)
    timed = measurer.measure([expert])[0]
    search = Search(op, target, measurer, budget, on_progress=on_progress,
                    reference_ms=timed.time_ms if timed.ok else None, references=frozenset({expert.kernel_key()}))
    AGENTS["evolve"](search, np.random.default_rng(seed), model=model, policy=policy)
    rebuilt = replay(op, expert, target, max_steps)
    expert_actions = rebuilt.actions if rebuilt else []
    faster = []   # (schedule, distance from the expert), fastest first
    for s in measured_seeds(search, 8 * contenders):
        if s.kernel_key() == expert.kernel_key():
            break
        if (r := replay(op, s, target, max_steps)) is not None:
            faster.append((s, _distance(r.actions, expert_actions)))
    half = contenders // 2
    picked = faster[:half] + sorted(faster[half:], key=lambda f: f[1])[:contenders - half]
    speedups = speedups_over(op, [s for s, _ in picked], expert, target, measurer, rounds) if picked else []
    best = teacher_index([d for _, d in picked], speedups)
    return (picked[best][0], speedups[best]) if best is not None else (expert, max(speedups, default=1.0))


def teacher_index(distances: list[int], speedups: list[float]) -> int | None:
    """Which contender teaches: of those within ``NEAR_BEST`` of the best speedup (and past
    ``MARGIN``), the nearest to the expert, the faster of equals; None where none beats the
    expert by ``MARGIN``."""
    top = max(speedups, default=0.0)
    near = [(d, -x, j) for j, (d, x) in enumerate(zip(distances, speedups)) if x >= max(MARGIN, NEAR_BEST * top)]
    return min(near)[2] if near else None


def _distance(actions: list[int], others: list[int]) -> int:
    """Actions of either sequence outside the matches ``difflib`` finds between the two: how
    far a teacher's decisions stray from the expert's."""
    same = sum(b.size for b in difflib.SequenceMatcher(a=actions, b=others, autojunk=False).get_matching_blocks())
    return len(actions) + len(others) - 2 * same


def imitate(agent, demos, epochs: int, seed: int, check_every: int = 50,
            on_check: Callable[[int, float], None] | None = None) -> float:
    """Behaviour cloning of the demonstrations into ``agent.policy``, for at most ``epochs``
    epochs: it stops once the greedy policy picks every demonstrated action (one wrong
    decision sends the rest of a greedy rollout elsewhere). Returns the greedy accuracy;
    ``on_check(epochs done, accuracy)`` hears of each check (progress on long imitations)."""
    import torch

    obs, masks, actions = (torch.as_tensor(x) for x in demos)
    policy = agent.policy
    opt = torch.optim.Adam(policy.parameters(), lr=1e-3)
    torch.manual_seed(seed)

    def accuracy() -> float:
        with torch.no_grad():
            dist = policy.get_distribution(obs, action_masks=masks.numpy())
            return float((dist.get_actions(deterministic=True) == actions).float().mean())

    for epoch in range(1, epochs + 1):
        _, log_prob, _ = policy.evaluate_actions(obs, actions, action_masks=masks)
        loss = -log_prob.mean()
        opt.zero_grad()
        loss.backward()
        opt.step()
        if epoch % check_every == 0:
            done = accuracy()
            if on_check:
                on_check(epoch, done)
            if done == 1.0:
                break
    return accuracy()


def kl_penalty(coef: float):
    """A PPO callback that charges each step's reward ``coef * (log pi(a|s) - log pi_0(a|s))``,
    ``pi_0`` a frozen copy of the policy as PPO starts (after imitation: the teacher's
    choices; on a resumed run, the policy as resumed), then recomputes the rollout's
    advantages. The sum is a sampled KL divergence from ``pi_0`` (RLHF's per-token
    penalty): PPO leaves the imitation only where the measured reward pays for it, so a
    few noisy episodes on the train shapes do not move choices it never saw rewarded."""
    import copy

    import torch
    from stable_baselines3.common.callbacks import BaseCallback
    from stable_baselines3.common.utils import obs_as_tensor

    class KLPenalty(BaseCallback):
        def _on_training_start(self) -> None:
            self.reference = copy.deepcopy(self.model.policy)
            self.reference.set_training_mode(False)

        def _on_step(self) -> bool:
            return True

        def _on_rollout_end(self) -> None:
            buf, device = self.model.rollout_buffer, self.model.device
            with torch.no_grad():
                _, ref_log_probs, _ = self.reference.evaluate_actions(
                    torch.as_tensor(buf.observations.reshape(-1, *buf.obs_shape), device=device),
                    torch.as_tensor(buf.actions.reshape(-1), device=device),
                    action_masks=torch.as_tensor(buf.action_masks.reshape(-1, buf.mask_dims), device=device))
                last_values = self.model.policy.predict_values(obs_as_tensor(self.model._last_obs, device))
            kl = buf.log_probs - ref_log_probs.cpu().numpy().reshape(buf.log_probs.shape)
            buf.rewards -= coef * kl
            self.logger.record("train/kl_to_start", float(kl.mean()))
            buf.compute_returns_and_advantage(last_values=last_values, dones=self.model._last_episode_starts)

    return KLPenalty()
