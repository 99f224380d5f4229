"""The CUDA action table: every sequence its mask allows ends in a kernel that passes
the GPU's rules, simulates correctly and compiles with nvcc; no GPU needed."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from agents.rollout import RandomDraw, rollout
from envs.actions import MAX_LOOPS, Action, ActionTable, NestInfo
from envs.features import featurize
from experiments.shapes import family
from kernels.codegen.rules import check_for_target
from kernels.experts import expert_schedule
from kernels.ir.ops import OPERATORS, make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule, ScheduleError, bound_axis
from kernels.target import cuda_target_for_compile
from tests.kernels.codegen.test_cuda import describe, needs_nvcc, nvcc_compile, simulate_schedule

TARGET = cuda_target_for_compile("sm_90")
OPS = tuple(OPERATORS)


def test_gpu_table_has_binds_and_no_parallel():
    op = make_op("matmul", "64x64x64")
    cpu, gpu = ActionTable(op), ActionTable(op, TARGET)
    prims = {a.primitive for a in gpu.actions}
    assert "bind" in prims and "parallel" not in prims
    assert "bind" not in {a.primitive for a in cpu.actions}
    assert len(gpu) == len(cpu) - MAX_LOOPS + 6 * MAX_LOOPS
    assert gpu.to_step(gpu.index[Action("bind", 0, axis="blockIdx.x")], Schedule(op).nest).thread_axis \
        == "blockIdx.x"


def test_done_waits_for_a_complete_schedule():
    op = make_op("matmul", "64x64x64")
    table = ActionTable(op, TARGET)
    s = Schedule(op)
    assert not table.mask(NestInfo(op, s.nest))[table.done]
    s = s.bind("i", "blockIdx.x")
    assert not table.mask(NestInfo(op, s.nest))[table.done]
    s = s.cache_write("j")
    assert table.mask(NestInfo(op, s.nest))[table.done]


def test_few_steps_left_allow_only_completing_actions():
    op = make_op("matmul", "64x64x64")
    table = ActionTable(op, TARGET)
    s = Schedule(op)
    mask = table.mask(NestInfo(op, s.nest), steps_left=3)
    assert {table.actions[a].primitive for a in np.flatnonzero(mask)} == {"bind"}
    s = s.bind("i", "blockIdx.x")
    mask = table.mask(NestInfo(op, s.nest), steps_left=2)
    assert {table.actions[a].primitive for a in np.flatnonzero(mask)} == {"cache_write"}
    mask = table.mask(NestInfo(op, s.nest), steps_left=5)
    assert {"split", "bind", "cache_write"} <= {table.actions[a].primitive for a in np.flatnonzero(mask)}


def test_thread_limits_are_masked():
    op = make_op("matmul", "4096x4096x64")
    table = ActionTable(op, TARGET)
    s = Schedule(op)
    mask = table.mask(NestInfo(op, s.nest))
    # 4096 threads in a block exceed 1024; 4096 blocks are fine
    assert not mask[table.index[Action("bind", 0, axis="threadIdx.x")]]
    assert mask[table.index[Action("bind", 0, axis="blockIdx.x")]]
    s = s.split("j", 64).bind("j_i", "threadIdx.x").bind("i", "blockIdx.y")
    mask = table.mask(NestInfo(op, s.nest))
    # 64 threads bound; binding the outer 64-long j_o as threads too would give 4096
    assert not mask[table.index[Action("bind", s.nest.index("j_o"), axis="threadIdx.y")]]


@settings(max_examples=60, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(OPS), data=st.data(), seed=st.integers(0, 2**32 - 1), max_steps=st.integers(3, 32))
def test_every_allowed_sequence_is_a_legal_gpu_kernel(op, data, seed, max_steps):
    """Along random masked rollouts every allowed action applies, wherever done is
    allowed the schedule passes the GPU rules, and a rollout always ends complete."""
    shape = data.draw(st.sampled_from(family(op, "small") + family(op, "train")[:2]), label="shape")
    operator = make_op(op, shape)
    table = ActionTable(operator, TARGET)
    rng = np.random.default_rng(seed)
    r = rollout(operator, table, RandomDraw(rng, p_done=0.1), max_steps=max_steps)
    s, actions = r.schedule, r.actions
    assert len(actions) <= max_steps - 1
    replay = Schedule(operator)
    for k, a in enumerate(actions + [table.done]):
        info = NestInfo(operator, replay.nest)
        mask = table.mask(info, actions[k - 1] if k else None, steps_left=max_steps - k)
        assert mask[a], f"{table.actions[a]} not allowed on\n{replay}"
        if mask[table.done]:
            check_for_target(replay, TARGET)
        for b in np.flatnonzero(mask):
            if b != table.done:
                try:
                    replay.apply(table.to_step(int(b), replay.nest))
                except ScheduleError as e:
                    pytest.fail(f"the mask allows {table.actions[b]} on\n{replay}\nbut: {e}")
        obs = featurize(operator, info, TARGET, k / max_steps)
        assert np.isfinite(obs).all()
        if a != table.done:
            replay = replay.apply(table.to_step(a, replay.nest))
    assert replay.nest == s.nest
    check_for_target(s, TARGET)


def _env_rollouts(kind: str, n: int, seed: int = 7) -> list[Schedule]:
    rng = np.random.default_rng(seed)
    out = []
    ops = [op for op in map(lambda sh: make_op(kind, sh), family(kind, "small")) if op.flops <= 20_000]
    for k in range(n):
        op = ops[k % len(ops)]   # small: the simulator runs every thread in Python
        out.append(rollout(op, ActionTable(op, TARGET), RandomDraw(rng, p_done=0.03)).schedule)
    return out


def test_env_rollouts_simulate_correctly():
    """The environment's random GPU kernels compute the reference's values (on a
    simulated grid of threads, small shapes), and they use the GPU primitives."""
    seen = set()
    for kind in ("matmul", "conv2d", "depthwise_conv2d"):
        for s in _env_rollouts(kind, 6):
            out, ref = simulate_schedule(s)
            np.testing.assert_allclose(out, ref, rtol=1e-5, atol=1e-5, err_msg=describe(s))
            seen |= {type(x).__name__ for x in s.steps}
            seen |= {bound_axis(l).split(".")[0] for l in s.nest.loops if bound_axis(l)}
    assert {"Bind", "CacheWrite", "CacheRead", "Unroll", "blockIdx", "threadIdx"} <= seen, seen


def test_gpu_expert_matmul_replays_as_actions():
    for shape in family("matmul", "train")[:3] + ["1024x1024x1024"]:
        op = make_op("matmul", shape)
        table = ActionTable(op, TARGET)
        expert = expert_schedule(op, TARGET)
        s, last = Schedule(op), None
        for k, a in enumerate(table.actions_for(expert)):
            assert table.mask(NestInfo(op, s.nest), last, steps_left=32 - k)[a], table.actions[a]
            if a != table.done:
                s, last = s.apply(table.to_step(a, s.nest)), a
        assert s.nest == expert.nest
        assert render(s, TARGET).source == render(expert, TARGET).source


@needs_nvcc
def test_env_rollouts_compile_with_nvcc(tmp_path):
    sources = [render(s, TARGET, name=f"{kind}_{n}").source
               for kind in OPS for n, s in enumerate(_env_rollouts(kind, 2, seed=11))]
    nvcc_compile(sources, tmp_path)


# ---------------------------------------------------------------- on a GPU

@pytest.fixture(scope="module")
def gpu_env():
    pytest.importorskip("cupy")
    from envs.schedule_env import ScheduleEnv
    from kernels.target import NoCudaDevice
    try:
        env = ScheduleEnv(op="matmul", shapes=["512x512x512", "96x80x64"], target="cuda")
    except NoCudaDevice as e:
        pytest.skip(str(e))
    yield env
    env.close()


def test_gpu_env_expert_and_random_episodes_are_correct(gpu_env):
    """The expert replayed as actions, and random masked episodes, measure correct on the GPU."""
    env = gpu_env
    obs, info = env.reset(seed=0, options={"shape": "512x512x512"})
    expert = env.table.actions_for(expert_schedule(env.op, env.target))
    for a in expert:
        assert env.action_masks()[a]
        obs, reward, terminated, truncated, info = env.step(a)
    assert terminated and info["correct"], info
    assert info["speedup"] > 1.0
    rng = np.random.default_rng(1)
    for _ in range(3):
        env.reset(seed=int(rng.integers(1 << 30)), options={"shape": "96x80x64"})
        done = False
        while not done:
            a = int(rng.choice(np.flatnonzero(env.action_masks())))
            obs, reward, terminated, truncated, info = env.step(a)
            done = terminated or truncated
        assert info["correct"], info


def test_long_rollouts_on_awkward_shapes_end_complete():
    """Long episodes on extents with tails still end in a complete kernel: splits with
    tails inside the reduction cannot outgrow a thread's tile."""
    rng = np.random.default_rng(3)
    for shape in ("256x3072x768", "3000x1000x2000", "127x255x65"):
        op = make_op("matmul", shape)
        table = ActionTable(op, TARGET)
        for _ in range(150):
            check_for_target(rollout(op, table, RandomDraw(rng, p_done=0.01)).schedule, TARGET)


def test_tails_inside_the_reduction_cannot_outgrow_a_thread_tile():
    op = make_op("matmul", "4x511x8")
    table = ActionTable(op, TARGET)
    s = Schedule(op).reorder("i", "k", "j")       # 511 outputs per thread, inside k
    mask = table.mask(NestInfo(op, s.nest))
    split_j = {table.actions[a].factor for a in np.flatnonzero(mask)
               if table.actions[a].primitive == "split" and table.actions[a].slot == 2}
    assert 0 in split_j        # by 2: 256 x 2 = 512 outputs, fits
    assert 1 not in split_j    # by 3: 171 x 3 = 513, one more than a thread's tile


def test_bound_loops_show_as_parallel_levels():
    from envs.features import KINDS, LOOP, LOOP_WIDTH
    op = make_op("matmul", "256x256x256")
    s = expert_schedule(op, TARGET)
    obs = featurize(op, NestInfo(op, s.nest), TARGET, 0.0)
    column = obs[:len(s.nest.loops) * LOOP_WIDTH].reshape(-1, LOOP_WIDTH)[:, LOOP["kind"].start + KINDS.index("parallel")]
    expected = [{"blockIdx": 1.0, "threadIdx": 2.0}[bound_axis(l).split(".")[0]] if bound_axis(l) else 0.0
                for l in s.nest.loops]
    assert column.tolist() == expected and 1.0 in expected and 2.0 in expected
