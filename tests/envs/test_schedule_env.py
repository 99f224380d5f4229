"""ScheduleEnv against its spec (the class docstring), on small shapes."""

from __future__ import annotations

import math

import numpy as np
import pytest

from envs import features
from envs.actions import MAX_LOOPS, Action, ActionTable
from envs.schedule_env import FAILED_SLOWDOWN, ScheduleEnv
from experiments.shapes import family
from kernels.experts import expert_schedule
from kernels.ir.ops import make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule
from kernels.target import cpu_target

from rollout_helpers import OPS, random_episode

END_KEYS = {"time_ms", "gflops", "speedup", "correct", "shape", "schedule", "measurements"}


# ---------------------------------------------------------------- construction errors

@pytest.mark.parametrize("kw, match", [
    (dict(op="nope", shape="1x1x1"), "unknown op 'nope'"),
    (dict(op="matmul", shape="16x16"), "3 numbers|expected"),
    (dict(op="matmul", shape="16x0x16"), "must be positive"),
    (dict(op="matmul", shape="16xfoox16"), "malformed shape"),
    (dict(op="conv2d", shape="1,4,8,8"), "expected"),
    (dict(op="conv2d", shape="1,4,2,2,8,3,3,1,0"), "does not fit"),
    (dict(op="matmul", shapes=["16x16x16", "4x4"]), "expected"),
    (dict(op="matmul"), "exactly one of shape= or shapes="),
    (dict(op="matmul", shape="16x16x16", shapes=["16x16x16"]), "exactly one of shape= or shapes="),
    (dict(op="matmul", shapes=[]), "empty"),
    (dict(op="matmul", shape="16x16x16", reward="speed"), "unknown reward mode"),
    (dict(op="matmul", shape="16x16x16", max_steps=0), "max_steps"),
    (dict(op="matmul", shape="16x16x16", target="tpu"), "unknown target"),
])
def test_bad_options_raise_value_error(kw, match, fake_measurer_cls):
    with pytest.raises(ValueError, match=match):
        ScheduleEnv(measurer=fake_measurer_cls(), **kw)


def test_empty_shape_string_raises_value_error(fake_measurer_cls):
    with pytest.raises(ValueError):
        ScheduleEnv(op="matmul", shape="", measurer=fake_measurer_cls())


def test_bad_shape_at_reset_raises_value_error(make_env):
    env = make_env("matmul", shape="16x16x16")
    with pytest.raises(ValueError, match="3 numbers|expected"):
        env.reset(options={"shape": "16x16"})


def test_step_before_reset_raises(fake_measurer_cls):
    env = ScheduleEnv(op="matmul", shape="16x16x16", measurer=fake_measurer_cls())
    with pytest.raises(RuntimeError, match="reset"):
        env.step(0)


def test_step_after_the_episode_ended_raises(fake_measurer_cls):
    env = ScheduleEnv(op="matmul", shape="16x16x16", measurer=fake_measurer_cls())
    env.reset(seed=0)
    env.step(env.table.done)
    with pytest.raises(RuntimeError, match="reset"):
        env.step(env.table.done)
    env.reset(seed=0)   # a new episode may start
    env.step(env.table.done)


# ---------------------------------------------------------------- seeding

def test_seeded_resets_are_deterministic(make_env):
    shapes = family("matmul", "small")

    def run(seed):
        env = make_env("matmul", shapes=shapes)
        out = [env.reset(seed=seed)]
        out += [env.reset() for _ in range(7)]
        return [info["shape"] for _, info in out], [obs for obs, _ in out]

    shapes_a, obs_a = run(123)
    shapes_b, obs_b = run(123)
    assert shapes_a == shapes_b
    assert all(np.array_equal(a, b) for a, b in zip(obs_a, obs_b))
    assert set(shapes_a) <= {make_env("matmul", shape=s).shapes[0] for s in shapes}
    sequences = {tuple(run(seed)[0]) for seed in range(6)}
    assert len(sequences) > 1, "different seeds never picked a different shape sequence"


def test_reset_option_picks_the_shape(make_env):
    env = make_env("matmul", shapes=family("matmul", "small"))
    for shape in ("13x7x29", "1x17x5"):
        _, info = env.reset(seed=0, options={"shape": shape})
        assert info["shape"] == shape and env.op.shape_str == shape


def test_same_seed_same_episode(make_env):
    """A seeded reset plus the same actions gives the same observations and rewards."""
    env = make_env("dense_bias_relu", shapes=family("dense_bias_relu", "small"), reward="surrogate")
    runs = [random_episode(env, np.random.default_rng(7), p_done=0.05, seed=5) for _ in range(2)]
    assert [s[:3] for s in runs[0][2]] == [s[:3] for s in runs[1][2]]
    assert runs[0][1]["shape"] == runs[1][1]["shape"]


# ---------------------------------------------------------------- observations and actions

@pytest.mark.parametrize("op", OPS)
def test_observations_stay_in_the_space(op, make_env):
    env = make_env(op, shapes=family(op, "small"), max_steps=24)
    rng = np.random.default_rng(OPS.index(op))
    seen = []

    def check(obs, reward, info):
        assert isinstance(obs, np.ndarray) and obs.dtype == np.float32
        assert obs.shape == (features.SIZE,)
        assert env.observation_space.contains(obs), f"{op} {env.op.shape_str}: {obs}"
        assert np.isfinite(reward)
        seen.append(obs.copy())

    for _ in range(2):
        random_episode(env, rng, p_done=0.02, p_forbidden=0.2, check=check)
    assert len(seen) > 4


@pytest.mark.parametrize("op", OPS)
def test_sizes_do_not_depend_on_the_shape(op, make_env):
    envs = [make_env(op, shape=s) for s in family(op, "small")]
    assert len({e.action_space.n for e in envs}) == 1
    assert len({e.observation_space.shape for e in envs}) == 1
    sizes = set()
    for e in envs:
        obs, _ = e.reset(seed=0)
        sizes.add(obs.shape)
        assert e.action_masks().shape == (e.action_space.n,)
    assert sizes == {(features.SIZE,)}
    assert features.SIZE == MAX_LOOPS * features.LOOP_WIDTH + features.GLOBAL_WIDTH


def test_action_space_is_the_same_for_every_op(make_env):
    assert len({make_env(op, shape=family(op, "small")[0]).action_space.n for op in OPS}) == 1


def test_observation_describes_the_nest(make_env):
    env = make_env("matmul", shape="16x16x16")
    obs, _ = env.reset(seed=0)
    present, extent, reduce = (features.LOOP[n].start for n in ("present", "log_extent", "reduce"))
    rows = obs[:features.ROWS].reshape(MAX_LOOPS, features.LOOP_WIDTH)
    assert rows[:3, present].tolist() == [1, 1, 1] and not rows[3:].any()  # i, j, k present
    assert rows[:, reduce].tolist()[:3] == [0, 0, 1]                        # k reduces
    assert np.allclose(rows[:3, extent], math.log2(17))                     # log2(1 + 16)
    split_i = env.table.index[Action("split", 0, 2)]                       # i -> 4 x 4
    obs, *_ = env.step(split_i)
    rows = obs[:features.ROWS].reshape(MAX_LOOPS, features.LOOP_WIDTH)
    assert rows[:4, present].tolist() == [1, 1, 1, 1] and np.allclose(rows[:2, extent], math.log2(5))


# ---------------------------------------------------------------- the mask and episode end

def test_masked_action_is_a_no_op(make_env):
    env = make_env("matmul", shape="16x16x16", reward="surrogate")
    obs, _ = env.reset(seed=0)
    mask = env.action_masks()
    forbidden = int(np.flatnonzero(~mask)[0])
    before = env.schedule
    obs2, reward, terminated, truncated, info = env.step(forbidden)
    assert reward == 0.0 and not terminated and not truncated
    assert "masked" in info["error"]
    assert env.schedule == before and np.array_equal(obs, obs2)
    assert np.array_equal(env.action_masks(), mask)


def test_truncation_at_max_steps(make_env):
    env = make_env("matmul", shape="16x16x16", max_steps=3)
    env.reset(seed=0)
    unroll_k = env.table.index[Action("unroll", 2)]
    for slot in (0, 1):
        swap = env.table.index[Action("swap", slot)]
        assert env.action_masks()[swap]
        _, _, terminated, truncated, info = env.step(swap)
        assert not (terminated or truncated) and "error" not in info
    mask = env.action_masks()      # the last step can only end the episode
    assert mask[env.table.done] and mask.sum() == 1
    _, _, terminated, truncated, info = env.step(unroll_k)   # masked now: a no-op, but it ends
    assert truncated and not terminated
    assert "masked" in info["error"] and END_KEYS <= info.keys()
    assert [s["step"] for s in info["schedule"]] == ["Reorder", "Reorder"]


def test_a_swap_cannot_be_undone_at_once(make_env):
    env = make_env("matmul", shape="16x16x16")
    env.reset(seed=0)
    swap0, swap1 = (env.table.index[Action("swap", s)] for s in (0, 1))
    env.step(swap0)
    mask = env.action_masks()
    assert not mask[swap0] and mask[swap1]
    env.step(swap1)
    assert env.action_masks()[swap0]


@pytest.mark.parametrize("op", ["matmul", "depthwise_conv2d"])
def test_episode_end_info(op, make_env):
    env = make_env(op, shape=family(op, "small")[1])
    _, info, _ = random_episode(env, np.random.default_rng(3), p_done=0.1, seed=0)
    assert END_KEYS <= info.keys()
    assert info["correct"] and "error" not in info
    assert info["shape"] == env.op.shape_str
    assert info["time_ms"] > 0 and info["gflops"] > 0
    assert math.isclose(info["speedup"], env.t_naive * 1e3 / info["time_ms"], rel_tol=1e-9)
    rebuilt = Schedule.from_json({"op": op, "shape": info["shape"], "steps": info["schedule"]})
    assert rebuilt.key() == env.schedule.key()
    assert isinstance(info["measurements"], int) and info["measurements"] >= 0


def test_render_ansi(make_env):
    env = make_env("matmul", shape="16x16x16", render_mode="ansi")
    assert env.render() is None
    env.reset(seed=0)
    text = env.render()
    assert isinstance(text, str) and "for i" in text and "for k" in text
    assert make_env("matmul", shape="16x16x16").render() is None


# ---------------------------------------------------------------- rewards

@pytest.mark.parametrize("reward", ["measure", "surrogate"])
@pytest.mark.parametrize("op", OPS)
def test_reward_telescopes(op, reward, make_env):
    env = make_env(op, shape=family(op, "small")[0], reward=reward)
    rng = np.random.default_rng(11 + OPS.index(op))
    rewards, info, _ = random_episode(env, rng, p_done=0.1, p_forbidden=0.1, seed=0)
    assert info["correct"] and "error" not in info, info
    assert math.isclose(sum(rewards), math.log(info["speedup"]), abs_tol=1e-6)
    if reward == "measure":
        assert all(r == 0.0 for r in rewards[:-1])


def test_surrogate_rewards_follow_the_cost_model(make_env):
    env = make_env("matmul", shape="16x16x16", reward="surrogate")
    env.reset(seed=0)
    cm = env.cost_model
    schedule = env.schedule
    steps = [Action("split", 1, 2), Action("swap", 2), Action("vectorize", 3), Action("parallel", 0)]
    for a in steps:
        assert env.action_masks()[env.table.index[a]], a
        _, reward, *_ = env.step(env.table.index[a])
        new = env.schedule
        expected = float(cm.predict([schedule])[0] - cm.predict([new])[0])
        assert math.isclose(reward, expected, abs_tol=1e-9), a
        schedule = new


def test_reward_telescopes_when_measuring_every_step(fake_measurer_cls):
    m = fake_measurer_cls(naive_ms=10.0)
    env = ScheduleEnv(op="matmul", shape="16x16x16", measure_every_step=True, measurer=m)
    env.reset(seed=0)
    t_prev = 10.0
    total = 0.0
    for a in [Action("split", 1, 2), Action("swap", 0), Action("swap", 2), Action("vectorize", 3),
              Action("unroll", 2)]:
        assert env.action_masks()[env.table.index[a]], a
        _, reward, *_ = env.step(env.table.index[a])
        t = m.time_ms(env.schedule.key())
        assert math.isclose(reward, math.log(t_prev / t), abs_tol=1e-9)
        t_prev, total = t, total + reward
    _, reward, terminated, _, info = env.step(env.table.done)
    total += reward
    assert terminated and info["correct"]
    assert math.isclose(total, math.log(info["speedup"]), abs_tol=1e-9)
    assert math.isclose(info["speedup"], 10.0 / m.time_ms(env.schedule.key()), rel_tol=1e-9)


@pytest.mark.parametrize("reward", ["measure", "surrogate"])
def test_failed_final_kernel_returns_minus_log_slowdown(reward, fake_measurer_cls):
    env = ScheduleEnv(op="matmul", shape="16x16x16", reward=reward,
                      measurer=fake_measurer_cls(fail=True))
    rewards, info, _ = random_episode(env, np.random.default_rng(0), p_done=0.0, seed=0)
    assert info["error"] and not info["correct"] and info["speedup"] == 0.0
    assert math.isclose(sum(rewards), -math.log(FAILED_SLOWDOWN), abs_tol=1e-9)


# ---------------------------------------------------------------- expert replay

@pytest.mark.parametrize("shape_index", [0, 1])
@pytest.mark.parametrize("op", OPS)
def test_expert_schedule_replays_through_actions(op, shape_index, make_env):
    target = cpu_target()
    shape = family(op, "small")[shape_index]
    expert = expert_schedule(make_op(op, shape), target)
    env = make_env(op, shape=shape)
    actions = ActionTable(expert.op).actions_for(expert)
    assert actions[-1] == env.table.done and len(actions) < env.max_steps
    env.reset(seed=0)
    for i, a in enumerate(actions):
        assert env.action_masks()[a], f"{op} {shape}: action {i} {env.table.actions[a]} is masked\n{env.schedule}"
        _, _, terminated, truncated, info = env.step(a)
        assert "error" not in info, info["error"]
        assert terminated == (i == len(actions) - 1) and not truncated
    assert info["correct"] and "error" not in info, info.get("error")
    assert render(env.schedule, target).source == render(expert, target).source
    assert env.schedule.nest == expert.nest
