"""ScheduleEnv: build a loop schedule step by step; the reward is measured speedup."""

from __future__ import annotations

from typing import Any, Sequence

import gymnasium as gym
import numpy as np
from gymnasium import spaces

from kernels.measure import Measurer
from kernels.ir.ops import make_op
from kernels.ir.printer import print_loop_nest
from kernels.ir.schedule import Schedule, ScheduleError
from kernels.target import Target, get_target

from . import features
from .actions import ActionTable, NestInfo
from .cost import AnalyticalCostModel, CostModel
from .reward import FAILED_SLOWDOWN, Reward, make_reward

# The default episode length: actions per episode, the final done included. The longest
# expert replay (the CPU conv2d's of a 3x3 layer: 39 steps, then done) fits, with room for
# teachers a search found (tests/agents/test_imitation.py replays every shipped one's).
MAX_STEPS = 48


class ScheduleEnv(gym.Env):
    """Schedule one tensor operator, one primitive per step.

    **Options** (``gymnasium.make("schedgym/Schedule-v2", ...)``): ``op`` (kind),
    ``shape`` or ``shapes`` (a family sampled at each reset; ``reset(options={"shape":
    ...})`` picks one), ``target`` ("cpu", "cuda", or a
    :class:`kernels.target.Target`), ``max_steps`` (``MAX_STEPS`` = 48),
    ``reward`` ("measure", "surrogate" or "measure_every_step"; ``envs/reward.py``),
    ``measure_every_step`` (False; True is ``reward="measure_every_step"``), ``cost_model``
    (default: :class:`AnalyticalCostModel`), ``update_cost_model`` (feed every measured
    final kernel to ``cost_model.update``), ``measurer`` / ``log_path`` (share a
    measurement cache; append every measurement to a tuning log).

    **Actions**: ``Discrete(n)``, the same ``n`` for every shape of an op kind. A loop
    slot is a position in the current nest (0 = outermost, at most ``MAX_LOOPS`` = 13);
    a factor slot indexes ``FACTORS`` = (2, 3, 4, 6, 7, 8, 16, 32, 64), capped at the
    loop's extent. ``action_masks()`` gives the legal ones.

    ======================  =========  ==========================================
    action                  count      step
    ======================  =========  ==========================================
    split(slot, factor)     13 x 9     ``Split(loop, factor)``
    tile(slot, factor)      12 x 9     ``Tile(loop, next loop, factor, factor)``
    swap(slot)              12         ``Reorder`` of the loop and the next inner one
    fuse(slot)              12         ``Fuse(loop, next loop)``
    vectorize(slot)         13         ``Vectorize``
    unroll(slot)            13         ``Unroll``
    parallel(slot)          13         ``Parallel`` (CPU only)
    bind(axis, slot)        6 x 13     ``Bind`` to blockIdx.x/y/z, threadIdx.x/y/z
                                       (CUDA only)
    cache_write(slot)       13         ``CacheWrite``
    cache_read(lhs, slot)   13         ``CacheRead`` of the first operand
    cache_read(rhs, slot)   13         ``CacheRead`` of the second operand
    done                    1          end the episode; the schedule is measured
    ======================  =========  ==========================================

    **Observation**: ``Box(0, 64, (SIZE,), float32)``: 13 loop-slot rows (zeros for
    empty slots), then globals. Sizes enter as ``log2(1 + x)``.

    ======================  =====  ==============================================
    feature                 width  meaning
    ======================  =====  ==============================================
    present                 1      the slot holds a loop
    log_extent              1      iterations of the loop
    reduce                  1      a reduction loop
    kind                    4      one-hot: serial, parallel, vectorize, unroll
                                   (a GPU loop bound to blocks: parallel = 1;
                                   to threads: parallel = 2)
    axis                    7      one-hot: the op axis it came from
    fused                   1      indices go through div/mod (a fused loop)
    anchor                  3      cache_write here; cache_read of lhs; of rhs
                                   (a stage's buffers: 1, or 2-4 where pipelined)
    log_stride              3      flat-index step per iteration: output, lhs, rhs
    log_footprint           3      elements of output, lhs, rhs this loop and those
                                   inside touch
    op_kind (global)        5      one-hot operator kind
    log_flops               1      total FLOPs
    log_intensity           1      FLOPs per byte of all tensors
    log_cores               1      target cores
    log_vector_lanes        1      fp32 SIMD lanes (a GPU: its warp)
    log_cache_bytes         3      data cache bytes: L1d, L2, L3 (a GPU: its L2 in
                                   the second column)
    log_shared_bytes        1      shared memory a GPU block may use (0 on a CPU)
    log_registers           2      GPU registers per block, per multiprocessor
                                   (0 on a CPU)
    step_fraction           1      steps taken / max_steps
    loop_fraction           1      loops / 13
    has                     4      a parallel or bound loop; a vectorized loop; cache_write;
                                   any cache_read
    log_axis_divisor        7      per op axis: log2 of the largest power of two, up to
                                   64, that divides its extent (whether a tile or an
                                   instruction's shape divides it)
    ======================  =====  ==============================================

    **Reward** (one class per mode in ``envs/reward.py``) telescopes,
    ``r_t = log(T_{t-1} / T_t)`` with ``T_0`` the measured time of the unscheduled
    kernel, so an episode's return is the log speedup of its final kernel. ``T_t``
    between steps is ``T_0`` times the cost model's predicted ratio (``surrogate``), a
    measurement (``measure_every_step``), or unchanged (``measure``: zero reward until
    the end). The final schedule is always measured and the last reward uses that
    measurement. A final kernel that fails to build, run or match the reference gets
    the return ``-log(10)`` (the mode's ``reward_on_error``) and ``info["error"]``. An
    action the mask forbids leaves the schedule unchanged, with reward 0 and
    ``info["error"]``.

    **Episode end**: ``done`` (terminated), or ``max_steps`` steps (truncated; the
    final schedule is still measured, so truncation is handled here, not by a
    ``TimeLimit`` wrapper).

    ``info`` at the end: ``time_ms``, ``gflops``, ``speedup``, ``correct``, ``error``,
    ``shape``, ``schedule`` (steps as JSON), ``measurements`` (new hardware
    measurements this episode).

    **Version history**: v0: initial version. v1: the target's caches and GPU registers
    and shared memory in the globals; 13 loop slots (12 before), so more actions too;
    episodes of 36 actions (32 before). v2: episodes of 48 actions (the CPU conv2d expert of
    a 3x3 layer takes 39 actions, then ``done``: with 36 its imitation was cut short); no
    fuse of one split's two halves.
    """

    metadata = {"render_modes": ["ansi"]}

    def __init__(self, op: str = "matmul", shape: str | None = None, shapes: Sequence[str] | None = None,
                 target: str | Target = "cpu", max_steps: int = MAX_STEPS, reward: str = "measure",
                 measure_every_step: bool = False, cost_model: CostModel | None = None,
                 measurer: Measurer | None = None, log_path: str | None = None,
                 update_cost_model: bool = False, render_mode: str | None = None, dtype: str = "fp32"):
        if (shape is None) == (shapes is None):
            raise ValueError("give exactly one of shape= or shapes=")
        self.reward: Reward = make_reward(reward)
        if measure_every_step:
            self.reward = make_reward("measure_every_step")
        if max_steps < 1:
            raise ValueError("max_steps must be at least 1")
        self.kind, self.dtype = op, dtype
        self.shapes = [make_op(op, s, dtype).shape_str for s in ([shape] if shape is not None else list(shapes))]
        if not self.shapes:
            raise ValueError("shapes= is empty")
        self.target = target if isinstance(target, Target) else get_target(target)
        self.max_steps = max_steps
        self.cost_model = cost_model or AnalyticalCostModel(self.target)
        self.owns_measurer = measurer is None
        self.measurer = measurer or Measurer(self.target, log=log_path)
        self.update_cost_model = update_cost_model
        self.render_mode = render_mode
        self.table = ActionTable(make_op(op, self.shapes[0], dtype), self.target)
        self.action_space = spaces.Discrete(len(self.table))
        self.observation_space = spaces.Box(0.0, features.HIGH, (features.SIZE,), np.float32)
        self.schedule: Schedule | None = None

    # ------------------------------------------------------------ gymnasium API
    def reset(self, *, seed: int | None = None, options: dict | None = None):
        super().reset(seed=seed)
        shape = (options or {}).get("shape")
        shape = make_op(self.kind, shape).shape_str if shape else \
            self.shapes[int(self.np_random.integers(len(self.shapes)))]
        self.op = make_op(self.kind, shape, self.dtype)
        self.schedule = Schedule(self.op)
        self.steps = 0
        self.last_action: int | None = None
        self.over = False
        self.measured_before = self.measurer.measured
        naive = self.measure(self.schedule)
        if not naive.ok:
            raise RuntimeError(f"the unscheduled {self.kind} {shape} failed to measure: {naive.error}")
        self.t_naive = naive.time_ms / 1e3
        self.reward.reset(self)
        self._refresh()
        return self.obs.copy(), {"shape": shape}

    def step(self, action):
        if self.schedule is None or self.over:
            raise RuntimeError("call reset() before step()")
        action = int(action)
        self.steps += 1
        info: dict[str, Any] = {}
        if action == self.table.done:
            return self._finish(terminated=True)
        try:
            if not self.mask[action]:
                raise ScheduleError(f"action {self.table.actions[action]} is masked")
            self.schedule = self.schedule.apply(self.table.to_step(action, self.schedule.nest))
        except ScheduleError as e:
            info["error"] = str(e)
        else:
            self.last_action = action
            self._refresh()
        if self.steps >= self.max_steps:
            return self._finish(terminated=False, info=info)
        reward = 0.0 if "error" in info else self.reward.step(self, self.schedule)
        return self.obs.copy(), reward, False, False, info

    def action_masks(self) -> np.ndarray:
        """Legal actions (sb3-contrib's MaskablePPO reads this)."""
        return self.mask.copy()

    def render(self):
        if self.render_mode == "ansi" and self.schedule is not None:
            return print_loop_nest(self.schedule, gpu=self.target.kind == "cuda")
        return None

    def close(self):
        if self.owns_measurer:
            self.measurer.close()

    # ------------------------------------------------------------ internals
    def _refresh(self) -> None:
        info = NestInfo(self.op, self.schedule.nest)
        self.mask = self.table.mask(info, self.last_action, steps_left=self.max_steps - self.steps)
        self.obs = features.featurize(self.op, info, self.target, self.steps / self.max_steps)

    def measure(self, schedule: Schedule):
        """A measurement of ``schedule`` (a MeasureResult), through the env's measurer."""
        # a kernel much slower than the naive one is timed by its checking call alone
        return self.measurer.measure_one(schedule, FAILED_SLOWDOWN * self.t_naive if schedule.steps else None)

    def expert_seconds(self, paired: bool = False) -> float | None:
        """Seconds of the expert schedule's kernel for this shape (measured once: the
        measurer caches it), or None where the operator has none or it fails. ``paired``:
        on a CPU, every later kernel of this shape is also timed in turn with the expert's
        and recorded in units of its time (``Measurer.pair_with``), so that a kernel's
        time against the expert's is a ratio of two kernels timed side by side, not of two
        moments of a shared machine."""
        from kernels.experts import expert_schedule

        try:
            expert = expert_schedule(self.op, self.target)
        except ValueError:
            return None
        if paired and self.target.kind == "cpu" and not self.measurer.paired(self.op):
            self.measurer.pair_with_schedule(self.op, expert)
        res = self.measure(expert)
        return res.time_ms / 1e3 if res.ok else None

    def predict(self, schedule: Schedule) -> float:
        """The cost model's prediction for ``schedule`` (log seconds, up to a constant)."""
        return float(self.cost_model.predict([schedule])[0])

    def _finish(self, terminated: bool, info: dict | None = None):
        self.over = True
        res = self.measure(self.schedule)
        t_final = res.time_ms / 1e3
        info = dict(info or {})
        info.update(time_ms=res.time_ms, gflops=res.gflops, speedup=self.t_naive / t_final if res.ok else 0.0,
                    correct=res.ok, shape=self.op.shape_str, schedule=self.schedule.steps_json(),
                    measurements=self.measurer.measured - self.measured_before)
        if not res.ok:
            info["error"] = res.error
        elif self.update_cost_model:
            self.cost_model.update([(self.schedule, t_final)])
        reward = self.reward.final(t_final) if res.ok else self.reward.reward_on_error()
        return self.obs.copy(), reward, terminated, not terminated, info

