"""The reward modes of :class:`~envs.schedule_env.ScheduleEnv`, one class each.

Every mode telescopes, ``r_t = log(T_{t-1} / T_t)`` with ``T_0`` the measured time of
the unscheduled kernel (of the expert's, in ``measure_vs_expert``) and the final ``T``
a measurement of the final kernel, so an episode's return is the log speedup of its
final kernel over ``T_0`` whatever the mode; a mode
says what ``T_t`` is between steps (:meth:`Reward.estimate`) and what a final kernel
that fails counts as (:meth:`Reward.reward_on_error`, after CompilerGym's ``Reward``).

The env's ``reward=`` option picks a mode by its ``name``. A new reward is one
subclass here, added to :data:`REWARDS`.
"""

from __future__ import annotations

import math
from typing import Protocol

from kernels.ir.schedule import Schedule
from kernels.measure import MeasureResult

FAILED_SLOWDOWN = 10.0  # a final kernel that fails counts as this much slower than naive


class Episode(Protocol):
    """What a reward may read and ask of the env (``ScheduleEnv`` is one)."""

    t_naive: float           # T_0: seconds of the unscheduled kernel
    schedule: Schedule       # the current schedule

    def measure(self, schedule: Schedule) -> MeasureResult: ...

    def predict(self, schedule: Schedule) -> float: ...

    def expert_seconds(self, paired: bool = False) -> float | None: ...


class Reward:
    """A reward mode. Per episode: :meth:`reset`, then :meth:`step` after each step that
    changed the schedule (not the last), then :meth:`final` or :meth:`reward_on_error`."""

    name = ""

    def reset(self, env: Episode) -> None:
        """A new episode; ``env.t_naive`` holds ``T_0`` in seconds."""
        self.t_naive = self.t_prev = env.t_naive

    def estimate(self, env: Episode, schedule: Schedule) -> float | None:
        """``T_t`` in seconds after a step, or None: unchanged (the step's reward is 0)."""
        return None

    def step(self, env: Episode, schedule: Schedule) -> float:
        """The reward of a step that led to ``schedule``."""
        t = self.estimate(env, schedule)
        if t is None:
            return 0.0
        reward, self.t_prev = math.log(self.t_prev / t), t
        return reward

    def final(self, seconds: float) -> float:
        """The last reward, given the measured time of the final kernel."""
        return math.log(self.t_prev / seconds)

    def reward_on_error(self) -> float:
        """The last reward when the final kernel fails to build, run or match the
        reference: it counts as ``FAILED_SLOWDOWN`` x ``T_0``, so the return is
        ``-log(FAILED_SLOWDOWN)``."""
        return self.final(FAILED_SLOWDOWN * self.t_naive)


class Measure(Reward):
    """Only measurements reward: zero until the end."""

    name = "measure"


class MeasureVsExpert(Measure):
    """Only measurements reward, against the expert schedule: ``T_0`` is the expert
    kernel's time (measured once per shape), so the return is ``log(T_expert / T)``.
    Returns of every shape centre on the teacher (an imitation policy's are about 0),
    so the advantages measure beating it rather than how slow each shape's naive
    kernel happens to be. On a CPU each final kernel is timed in turn with the expert's
    (``paired``): on a shared machine two kernels timed apart differ by more than a policy
    gains on its teacher. Without an expert for the operator, ``T_0`` stays the naive
    kernel's."""

    name = "measure_vs_expert"

    def reset(self, env: Episode) -> None:
        super().reset(env)
        self.t_prev = env.expert_seconds(paired=True) or env.t_naive


class Surrogate(Reward):
    """Between steps, ``T_0`` times the cost model's predicted ratio to the naive kernel."""

    name = "surrogate"

    def reset(self, env: Episode) -> None:
        super().reset(env)
        self.pred_naive = env.predict(env.schedule)

    def estimate(self, env: Episode, schedule: Schedule) -> float:
        return self.t_naive * math.exp(env.predict(schedule) - self.pred_naive)


class MeasureEveryStep(Reward):
    """Every step's schedule is measured (a kernel that fails leaves ``T`` unchanged)."""

    name = "measure_every_step"

    def estimate(self, env: Episode, schedule: Schedule) -> float | None:
        res = env.measure(schedule)
        return res.time_ms / 1e3 if res.ok else None


REWARDS: dict[str, type[Reward]] = {cls.name: cls for cls in (Measure, MeasureVsExpert, Surrogate, MeasureEveryStep)}


def make_reward(name: str) -> Reward:
    if name not in REWARDS:
        raise ValueError(f"unknown reward mode {name!r}; use one of {', '.join(REWARDS)}")
    return REWARDS[name]()
