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
from envs.schedule_env import MAX_STEPS
from experiments.shapes import family
from kernels.ir.dtypes import DTYPES
from kernels.codegen.rules import check_for_target
from kernels.experts import expert_schedule
from kernels.ir.ops import OPERATORS, make_op
from kernels.codegen import render
from kernels.ir.schedule import Schedule, ScheduleError, bound_axis
from kernels.target import cpu_target, cuda_target_for_compile
from tests.kernels.codegen.test_cuda import describe, needs_nvcc, nvcc_compile, simulate_schedule

TARGET = cuda_target_for_compile("sm_90")
OPS = tuple(OPERATORS)


def test_gpu_table_has_binds_and_no_parallel():
    op = make_op("matmul", "64x64x64")
    cpu, gpu = ActionTable(op), ActionTable(op, TARGET)
    prims = {a.primitive for a in gpu.actions}
    assert "bind" in prims and "parallel" not in prims
    assert "bind" not in {a.primitive for a in cpu.actions}
    assert len(gpu) == len(cpu) - MAX_LOOPS + 6 * MAX_LOOPS + 4   # + tensorize, double_buffer A and B, warpgroup
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


# the tensor-core convolution's m along a row (x >= 16), along images (batch >= 16) or along
# fused pixels, with warps and slices that take no split (a factor of 1)
CONV_TC_SHAPES = ["1,16,4,16,16,1,1,1,0", "16,32,3,3,8,1,1,1,0", "1,16,5,5,8,1,1,1,0", "16,64,56,56,64,3,3,1,1",
                  "1,384,7,7,1024,1,1,1,0", "16,256,14,14,1024,1,1,1,0"]


@pytest.mark.parametrize("kind,dtype", [("matmul", "fp32"), ("matmul", "bf16"), ("matmul", "tf32"),
                                        ("conv2d", "bf16"), ("conv2d", "tf32")])
def test_gpu_expert_replays_as_actions(kind, dtype):
    """Imitation learns the experts from these actions: every one allowed by the mask, within
    an episode, rebuilding the expert's nest and source."""
    shapes = family("matmul", "train")[:3] + ["1024x1024x1024"] if kind == "matmul" else CONV_TC_SHAPES
    for shape in shapes:
        op = make_op(kind, shape, dtype)
        table = ActionTable(op, TARGET)
        expert = expert_schedule(op, TARGET)
        s, last = Schedule(op), None
        for k, a in enumerate(table.actions_for(expert)):
            assert table.mask(NestInfo(op, s.nest), last, steps_left=MAX_STEPS - k)[a], table.actions[a]
            if a != table.done:
                s, last = s.apply(table.to_step(a, s.nest)), a
        assert s.nest == expert.nest and k < MAX_STEPS
        assert render(s, TARGET).source == render(expert, TARGET).source
        assert kind == "matmul" or expert.nest.tensorized, shape


@pytest.mark.parametrize("shape", CONV_TC_SHAPES[:3] + ["1,16,4,16,16,3,3,1,1"])
def test_tensor_core_conv_expert_simulates_correctly(shape):
    from kernels.experts import _gpu_conv2d_tensor_cores   # the expert takes it from 8192 outputs a channel

    s = _gpu_conv2d_tensor_cores(make_op("conv2d", shape, "bf16"), TARGET)
    assert s.nest.tensorized
    out, ref = simulate_schedule(s)
    np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


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


# ---------------------------------------------------------------- tensor cores

def _mma_prefix(op) -> Schedule:
    """The instruction's tile innermost (16 x 8 x k), not yet tensorized."""
    k = DTYPES[op.dtype].mma_k
    return Schedule(op).split("i", 16).split("j", 8).split("k", k).reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i")


def _offered(s: Schedule, table: ActionTable) -> bool:
    return bool(table.mask(NestInfo(s.op, s.nest))[table.index[Action("tensorize")]])


def test_tensorize_is_offered_only_where_it_applies():
    for dtype in ("fp32", "bf16"):   # on a CPU: no tensor cores
        assert "tensorize" not in {a.primitive for a in ActionTable(make_op("matmul", "64x64x64", dtype)).actions}
    for dtype in ("fp32", "tf32", "bf16", "fp16"):
        op = make_op("matmul", "64x64x64", dtype)
        table = ActionTable(op, TARGET)
        assert not _offered(Schedule(op), table)
        s = _mma_prefix(op)
        assert _offered(s, table)
        assert not _offered(s.apply(table.to_step(table.index[Action("tensorize")], s.nest)), table)  # once
    fp32 = make_op("matmul", "64x64x64")
    assert not _offered(Schedule(fp32).split("i", 16).split("j", 8).split("k", 16)     # k 16: fp32 takes tf32's 8
                        .reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i"), ActionTable(fp32, TARGET))
    bf16 = make_op("matmul", "64x64x64", "bf16")
    table = ActionTable(bf16, TARGET)
    assert not _offered(Schedule(bf16).split("i", 16).split("j", 8).split("k", 8)     # k 8: tf32's, not bf16's
                        .reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i"), table)
    assert not _offered(Schedule(bf16).split("i", 8).split("j", 16).split("k", 16)    # m and n exchanged
                        .reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i"), table)
    assert not _offered(Schedule(make_op("matmul", "64x64x60", "bf16")).split("i", 16).split("j", 8).split("k", 16)
                        .reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i"),            # a tail of k
                        ActionTable(make_op("matmul", "64x64x60", "bf16"), TARGET))
    conv = make_op("conv2d", "1,32,8,8,16,3,3,1,1", "bf16")      # implicit GEMM: x as m, k as n, c as k
    s = Schedule(conv).split("x", 8).split("k", 8).split("c", 16)
    assert not _offered(s, ActionTable(conv, TARGET))
    assert not _offered(Schedule(make_op("depthwise_conv2d", "1,16,16,16,3,3", "bf16")),
                        ActionTable(make_op("depthwise_conv2d", "1,16,16,16,3,3", "bf16"), TARGET))


def test_warpgroup_is_offered_only_where_wgmma_applies():
    """On Hopper, at the end of the warpgroup expert's steps, in every dtype wgmma takes
    (not on sm_80, not for the mma expert's nest whose warps run along threadIdx.x); after
    it only deeper pipelines and done."""
    from kernels import experts
    from kernels.ir.schedule import Warpgroup

    def offered(s: Schedule, target=TARGET) -> bool:
        table = ActionTable(s.op, target)
        return bool(table.mask(NestInfo(s.op, s.nest))[table.index[Action("warpgroup")]])
    op = make_op("matmul", "256x256x256", "bf16")
    wg = expert_schedule(op, TARGET)
    assert isinstance(wg.steps[-1], Warpgroup)
    before = Schedule(op, wg.steps[:-1])
    assert offered(before) and not offered(wg)
    assert not offered(before, cuda_target_for_compile("sm_80"))
    assert not offered(experts._gpu_matmul_tensor_cores(op, TARGET, False))
    fp16 = make_op("matmul", "256x256x256", "fp16")
    assert offered(Schedule(fp16, before.steps))
    tf32 = make_op("matmul", "256x256x256", "tf32")   # B transposed in its stage
    tf32_wg = expert_schedule(tf32, TARGET)
    assert isinstance(tf32_wg.steps[-1], Warpgroup)
    assert offered(Schedule(tf32, tf32_wg.steps[:-1]))
    assert not offered(Schedule(tf32, experts._gpu_matmul_tensor_cores(tf32, TARGET, False).steps))
    table = ActionTable(op, TARGET)
    after = {table.actions[a].primitive for a in np.flatnonzero(table.mask(NestInfo(op, wg.nest)))}
    assert after <= {"double_buffer", "done"} and "done" in after


@pytest.mark.parametrize("split,message", [
    (("i", 16, "j", 8, "k", 8), "loop 'k_i' has extent 8; the bf16 instruction's k is 16"),
    (("i", 8, "j", 16, "k", 16), "loop 'i_i' has extent 8; the bf16 instruction's m is 16"),
    (("j", 16, "i", 8, "k", 16), "loop 'i_i' has extent 8; the bf16 instruction's m is 16"),
])
def test_a_wrong_tile_is_refused_naming_why(split, message):
    op = make_op("matmul", "64x64x64", "bf16")
    a, fa, b, fb, c, fc = split
    s = Schedule(op).split(a, fa).split(b, fb).split(c, fc).reorder("i_o", "j_o", "k_o", "i_i", "j_i", "k_i")
    with pytest.raises(ScheduleError, match=message):
        s.tensorize("i_i", "j_i", "k_i")


def test_tensorize_refusals():
    op = make_op("matmul", "64x64x64", "bf16")
    fp32 = make_op("matmul", "64x64x64")
    with pytest.raises(ScheduleError, match="tensor cores need a cuda target, not cpu"):
        check_for_target(_mma_prefix(fp32).tensorize("i_i", "j_i", "k_i"), cpu_target())
    with pytest.raises(ScheduleError, match="the tile must be the three innermost loops"):
        Schedule(op).split("i", 16).split("j", 8).split("k", 16).tensorize("i_i", "j_i", "k_i")
    with pytest.raises(ScheduleError, match="cannot be the tile's m"):
        _mma_prefix(op).tensorize("j_i", "i_i", "k_i")
    with pytest.raises(ScheduleError, match="reduction has a tail"):
        _mma_prefix(make_op("matmul", "64x64x40", "bf16")).tensorize("i_i", "j_i", "k_i")
    with pytest.raises(ScheduleError, match="dtype bf16 runs on cuda only; on cpu use fp32"):
        check_for_target(Schedule(op), cpu_target())


def tensor_core_rollouts(kind: str, shape: str, dtype: str, n: int, seed: int = 3, target=TARGET) -> list[Schedule]:
    """Random masked rollouts from the instruction's tile, innermost, on: each takes the
    tensorize action first, then whatever the mask allows (every allowed action is tried)."""
    op = make_op(kind, shape, dtype)
    table = ActionTable(op, target)
    rng = np.random.default_rng(seed)
    out = []
    for _ in range(n):
        s = _mma_prefix(op)
        s = s.apply(table.to_step(table.index[Action("tensorize")], s.nest))
        last = None
        for k in range(24):
            mask = table.mask(NestInfo(op, s.nest), last, steps_left=24 - k)
            for b in np.flatnonzero(mask):
                if b != table.done:
                    s.apply(table.to_step(int(b), s.nest))   # raises if the mask is wrong
            if mask[table.done] and rng.random() < 0.1:
                break
            a = int(rng.choice(np.flatnonzero(mask)))
            if a == table.done:
                break
            s, last = s.apply(table.to_step(a, s.nest)), a
        check_for_target(s, target)
        assert s.nest.tensorized
        out.append(s)
    return out


TC_CASES = [("matmul", "48x40x64", "bf16"), ("matmul", "33x17x32", "fp16"), ("matmul", "32x24x24", "tf32"),
            ("dense_bias_relu", "32x16x32", "bf16"), ("batch_matmul", "2x16x16x32", "bf16"),
            ("matmul", "40x24x48", "fp32"), ("dense_bias_relu", "17x16x64", "fp32")]


@pytest.mark.parametrize("kind,shape,dtype", TC_CASES)
def test_random_tensor_core_rollouts_simulate_correctly(kind, shape, dtype):
    for s in tensor_core_rollouts(kind, shape, dtype, 3):
        out, ref = simulate_schedule(s)
        np.testing.assert_allclose(out, ref, rtol=1e-6, atol=1e-6, err_msg=describe(s))


@needs_nvcc
@pytest.mark.parametrize("arch", ["sm_80", "sm_90"])
def test_random_tensor_core_schedules_compile_with_nvcc(tmp_path, arch):
    target = cuda_target_for_compile(arch)
    sources = [render(s, target, name=f"tc_{dtype}_{n}_{i}").source
               for n, (kind, shape, dtype) in enumerate(TC_CASES + [("matmul", "1024x1024x1024", "bf16")])
               for i, s in enumerate(tensor_core_rollouts(kind, shape, dtype, 4, seed=n, target=target))]
    for dtype in ("fp32", "tf32", "bf16", "fp16"):
        op = make_op("matmul", "4096x4096x4096", dtype)
        s = expert_schedule(op, target)
        assert s.nest.tensorized
        sources.append(render(s, target, name=f"expert_{dtype}").source)
    conv = expert_schedule(make_op("conv2d", "16,1024,14,14,256,1,1,1,0"), target)   # fp32, 3xTF32
    assert conv.nest.tensorized
    sources.append(render(conv, target, name="expert_conv_fp32").source)
    # warpgroup experts on sm_90 with tails, a batch and a bias (tf32: B transposed into its stage)
    for n, (kind, shape) in enumerate([("matmul", "100x72x192"), ("batch_matmul", "2x64x64x64"),
                                       ("dense_bias_relu", "200x136x96")]):
        op = make_op(kind, shape, "tf32")
        sources.append(render(expert_schedule(op, target), target, name=f"expert_tf32_{n}").source)
    nvcc_compile(sources, tmp_path, arch)


@pytest.mark.parametrize("kind,shape,dtype", TC_CASES + [("matmul", "256x192x128", "bf16")])
def test_gpu_random_tensor_core_schedules_match_reference(kind, shape, dtype, tmp_path):
    """Random tensor-core kernels (ldmatrix, padded and double-buffered stages included)
    are correct on the GPU."""
    pytest.importorskip("cupy")
    from kernels.measure import Builder, Candidate, Measurer, Runner
    from kernels.target import NoCudaDevice, get_target
    try:
        target = get_target("cuda")
    except NoCudaDevice as e:
        pytest.skip(str(e))
    with Measurer(target, Builder(cache_dir=tmp_path), Runner(timeout_s=60, repeats=2, min_time_s=0.0)) as m:
        for s in tensor_core_rollouts(kind, shape, dtype, 6, seed=5):
            kernel = render(s, target)
            res = m.measure_one(Candidate(s.op, f"source:{kernel.digest}", kernel))
            assert res.ok and res.correct, f"{res.error}\n{describe(s)}"
