"""Imitation teaches whole schedules: every expert a shipped policy imitates replays within
an episode, and the greedy policy of a finished imitation rebuilds its teachers."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from agents.imitation import demonstrations, experts, imitate, replay
from envs import MAX_STEPS
from experiments.pretrained import ROOT
from experiments.shapes import family
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule
from kernels.target import cpu_target, cuda_target_for_compile

SHIPPED = sorted(ROOT.glob("*/*-ppo.json"))


@pytest.mark.parametrize("spec", SHIPPED, ids=lambda p: f"{p.parent.name}-{p.stem}")
def test_every_expert_of_a_shipped_policy_replays_within_an_episode(spec):
    meta = json.loads(spec.read_text())
    kind, dtype = meta["op"], spec.stem.removesuffix("-ppo").partition("-")[2] or "fp32"
    target = cpu_target() if meta["target"] == "cpu" else cuda_target_for_compile()
    for shape in meta["shapes"] + family(kind, "held_out"):
        schedule = experts(kind, [shape], target, dtype)[shape]
        assert replay(make_op(kind, shape, dtype), schedule, target, MAX_STEPS) is not None, \
            f"the {meta['target']} {dtype} expert of {kind} {shape} is cut short or has no action sequence"


def test_the_seven_pixel_conv_tile_replays_at_every_width():
    """A thread's 7 adjacent pixels: 7 is a factor slot, and rows wider than a block's 56
    columns split a thread's pixels off first (56 is none)."""
    from kernels.experts import _conv_tile

    target = cuda_target_for_compile()
    for shape in ("1,32,112,112,64,3,3,1,1", "1,3,224,224,64,7,7,2,3", "1,64,56,56,64,3,3,1,1", "4,64,28,28,64,3,3,1,1",
                  "8,256,14,14,256,3,3,1,1"):
        op = make_op("conv2d", shape)
        assert _conv_tile(op, target)[1] == 7, shape
        assert replay(op, experts("conv2d", [shape], target)[shape], target, MAX_STEPS) is not None, shape


def test_a_schedule_outside_the_action_table_has_no_replay():
    op = make_op("matmul", "64x64x64")
    assert replay(op, Schedule(op).split("i", 5), cpu_target(), MAX_STEPS) is None   # 5: no factor slot
    expert = experts("matmul", ["64x64x64"], cpu_target())["64x64x64"]
    assert replay(op, expert, cpu_target(), 3) is None   # cut short


def test_imitation_stops_once_greedy_rebuilds_every_teacher(tmp_path):
    from agents.policy import new_agent
    from envs.schedule_env import ScheduleEnv
    from kernels.measure import Builder, Measurer

    measurer = Measurer(cpu_target(), builder=Builder(cache_dir=tmp_path))
    agent = new_agent(ScheduleEnv(op="matmul", shape="16x24x8", measurer=measurer), dict(n_steps=8, batch_size=8))
    shapes = ["64x64x64", "128x64x32"]
    demos = demonstrations("matmul", experts("matmul", shapes, cpu_target()), cpu_target(), MAX_STEPS)
    assert len(demos[2]) and np.all(demos[1][np.arange(len(demos[2])), demos[2]])   # each action allowed
    checks = []
    assert imitate(agent, demos, epochs=3000, seed=0, on_check=lambda *c: checks.append(c)) == 1.0
    assert checks[-1][1] == 1.0 and checks[-1][0] < 3000   # it stopped at the first perfect check
    assert [e for e, _ in checks] == list(range(50, checks[-1][0] + 1, 50))


def test_a_searched_teacher_replays_and_beats_the_expert(tmp_path):
    """Whatever the search finds, a teacher is the expert or a kernel that the env's actions
    rebuild and that beat the expert by the margin when timed beside it."""
    from agents.imitation import MARGIN, search_teachers
    from agents.cost_model import LearnedCostModel
    from kernels.measure import Builder, Measurer

    target = cpu_target()
    with Measurer(target, builder=Builder(cache_dir=tmp_path), log=tmp_path / "log.jsonl") as measurer:
        found = {shape: (teacher, speedup) for shape, teacher, speedup in search_teachers(
            "matmul", ["24x40x16"], target, measurer, LearnedCostModel(target=target), None, budget=4, seed=0, rounds=1)}
        assert measurer.measured <= 4 + 1   # the budget and the expert (contenders are re-timed, not logged)
    assert set(found) == {"24x40x16"}
    for shape, (teacher, speedup) in found.items():
        op = make_op("matmul", shape)
        expert = experts("matmul", [shape], target)[shape]
        assert teacher.key() == expert.key() or speedup >= MARGIN
        assert replay(op, teacher, target, MAX_STEPS) is not None


def test_the_teacher_is_the_nearest_to_the_expert_of_the_nearly_fastest():
    """A kernel 1% slower than the best but two decisions from the expert teaches before one
    ten decisions away; none beyond the margin: the expert teaches."""
    from agents.imitation import _distance, teacher_index

    assert _distance([1, 2, 3, 4], [1, 2, 3, 4]) == 0
    assert _distance([1, 2, 5, 4], [1, 2, 3, 4]) == 2
    assert teacher_index([10, 2, 1], [1.30, 1.29, 1.10]) == 1
    assert teacher_index([10, 2], [1.30, 1.20]) == 0
    assert teacher_index([3, 3], [1.20, 1.25]) == 1
    assert teacher_index([1, 2], [1.01, 0.90]) is None
    assert teacher_index([], []) is None


@pytest.mark.parametrize("kind", ["matmul", "dense_bias_relu", "batch_matmul", "conv2d", "depthwise_conv2d"])
def test_the_many_family_draws_distinct_valid_shapes_none_held_out(kind):
    """The same shapes on every machine (seeded), each a valid operator, none held out or
    twice, and the default train split kept."""
    from experiments.shapes import _drawn

    train = family(kind, "train", "many")
    assert len(train) == len(set(train)) == len(family(kind, "train")) + 60
    assert train[:len(family(kind, "train"))] == family(kind, "train")
    assert not set(train) & set(family(kind, "held_out"))
    for shape in train:
        make_op(kind, shape)
    assert _drawn(kind, 5, 1, set()) == _drawn(kind, 5, 1, set())


def test_the_gpu_families_grow_and_never_train_on_the_compared_shapes():
    """gpu-more holds gpu-many whole; neither trains on a held-out shape or on one of the
    drawn shapes the GPU policies' greedy kernels are compared on."""
    from experiments.shapes import GPU_DRAWN

    for kind, extra in (("matmul", 120), ("conv2d", 100)):
        many, more = family(kind, "train", "gpu-many"), family(kind, "train", "gpu-more")
        assert len(more) == len(set(more)) == len(many) + extra and more[:len(many)] == many
        assert len(GPU_DRAWN[kind]) == len(set(GPU_DRAWN[kind])) == 40
        assert not set(more) & {*family(kind, "held_out", "gpu-many"), *family(kind, "held_out"), *GPU_DRAWN[kind]}
        for shape in more[len(many):]:
            make_op(kind, shape)
    assert family("matmul", "train", "gpu-more")[:10] == family("matmul", "train", "gpu")
    more, large = family("matmul", "train", "gpu-more"), family("matmul", "train", "gpu-large")
    assert large[:len(more)] == more and len(large) == len(set(large)) == len(more) + 60
    assert not set(large) & {*family("matmul", "held_out", "gpu"), *family("matmul", "held_out"), *GPU_DRAWN["matmul"]}
    assert all(512 <= int(x) <= 8192 for s in large[len(more):] for x in s.split("x"))


def test_kl_penalty_charges_each_step_its_divergence_from_the_start(tmp_path):
    """Each step's reward loses coef * (log pi - log pi_0) of its action, pi_0 the policy as
    PPO started, and the advantages are recomputed from the charged rewards."""
    import torch
    from stable_baselines3.common.vec_env import DummyVecEnv

    from agents.imitation import kl_penalty
    from agents.policy import new_agent
    from envs.schedule_env import ScheduleEnv
    from kernels.measure import Measurer

    measurer = Measurer(cpu_target(), log=tmp_path / "log.jsonl")
    env = DummyVecEnv([lambda: ScheduleEnv(op="matmul", shape="16x16x16", max_steps=4, reward="surrogate",
                                           measurer=measurer)])
    agent = new_agent(env, dict(n_steps=16, batch_size=16), seed=0)
    _, callback = agent._setup_learn(16, kl_penalty(0.5))
    callback.on_training_start(locals(), globals())
    with torch.no_grad():   # PPO has moved away from where it started
        for p in agent.policy.action_net.parameters():
            p.add_(torch.randn_like(p))
    buf, charged = agent.rollout_buffer, {}
    compute = buf.compute_returns_and_advantage

    def spy(**kw):
        charged.setdefault("before", (buf.rewards.copy(), buf.advantages.copy()))
        compute(**kw)
    buf.compute_returns_and_advantage = spy
    agent.collect_rollouts(env, callback, buf, n_rollout_steps=16)
    measurer.close()
    ref = callback.reference
    with torch.no_grad():
        _, ref_log_probs, _ = ref.evaluate_actions(torch.as_tensor(buf.observations.reshape(16, -1)),
                                                   torch.as_tensor(buf.actions.reshape(-1)),
                                                   action_masks=torch.as_tensor(buf.action_masks.reshape(16, -1)))
    kl = buf.log_probs - ref_log_probs.numpy().reshape(buf.log_probs.shape)
    rewards, advantages = charged["before"]
    assert kl.mean() > 0.01
    np.testing.assert_allclose(buf.rewards, rewards - 0.5 * kl, rtol=1e-5, atol=1e-6)
    assert not np.allclose(buf.advantages, advantages)


def test_an_interrupted_teacher_search_keeps_the_teachers_it_found(monkeypatch, capsys, tmp_path):
    """Ctrl-C during the teacher searches: the shapes searched keep their teachers (also in
    the run's record), the others their experts, and training goes on to imitate them
    (nothing measured is lost)."""
    import agents.imitation
    from experiments import train

    target = cpu_target()
    shapes = ["24x40x16", "16x16x16", "32x8x8"]
    taught = experts("matmul", shapes, target)
    found = Schedule(make_op("matmul", shapes[0])).split("j", 8)

    def interrupted(*args, **kwargs):
        yield shapes[0], found, 1.2
        raise KeyboardInterrupt

    monkeypatch.setattr(agents.imitation, "search_teachers", interrupted)
    cfg = train.Config(op="matmul", teacher_budget=4)
    record = tmp_path / "teachers.jsonl"
    speedups = train._search_teachers(cfg, shapes, target, None, None, None, taught, record)
    assert speedups == {shapes[0]: 1.2}
    assert taught[shapes[0]] is found
    (line,) = record.read_text().splitlines()
    saved = json.loads(line)
    assert (saved["shape"], saved["speedup"]) == (shapes[0], 1.2)
    assert Schedule.from_json(saved["schedule"]).key() == found.key()
    assert taught[shapes[1]].key() == experts("matmul", [shapes[1]], target)[shapes[1]].key()
    assert "interrupted after 1 of 3 shapes" in capsys.readouterr().err


def test_a_resumed_run_searches_only_the_shapes_its_interrupted_search_left(monkeypatch, tmp_path):
    """`train --resume` after Ctrl-C in the teacher searches: the shapes searched before keep
    their recorded teachers and are not searched again; the others are, and the policy then
    imitates all of them."""
    import agents.imitation
    from experiments import train

    shapes = family("matmul", "small")
    asked = []

    def searches(stop_after):
        def search(op_kind, wanted, *args, skip=frozenset(), **kwargs):
            asked.append(set(wanted) - skip)
            for i, shape in enumerate(s for s in wanted if s not in skip):
                if i == stop_after:
                    raise KeyboardInterrupt
                yield shape, Schedule(make_op(op_kind, shape)).split("j", 4), 1.1 + i / 100
        return search

    monkeypatch.setattr(agents.imitation, "search_teachers", searches(1))
    common = dict(timesteps=0, imitation_epochs=50, runs=str(tmp_path))
    first = train.run(train.Config(op="matmul", shapes="small", teacher_budget=2, **common))
    assert list(first["teachers"]) == shapes[:1]
    monkeypatch.setattr(agents.imitation, "search_teachers", searches(99))
    again = train.run(train.Config(resume=first["run_dir"], **common))
    assert asked == [set(shapes), set(shapes[1:])]
    run = Path(first["run_dir"])
    record = [json.loads(line) for line in (run / "teachers.jsonl").read_text().splitlines()]
    assert sorted(r["shape"] for r in record) == sorted(shapes)
    assert set(again["teachers"]) == set(shapes) and again["teachers"][shapes[0]] == 1.1
    spec = json.loads((run / "policy.json").read_text())
    assert set(spec["teachers"]) == set(shapes)


def test_a_teacher_record_of_another_operator_is_refused(tmp_path):
    from experiments import train

    record = tmp_path / "teachers.jsonl"
    other = Schedule(make_op("conv2d", "1,8,8,8,8,3,3,1,1"))
    record.write_text(json.dumps({"shape": "1,8,8,8,8,3,3,1,1", "speedup": 1.2, "schedule": other.to_json()}) + "\n"
                      + '{"shape": "16x16x16", "spee')   # the last line cut short: passed over
    with pytest.raises(ValueError, match="teachers.jsonl:1 is no teacher of matmul"):
        train._recorded_teachers(record, train.Config(op="matmul"), ["16x16x16"])
    record.write_text('{"shape": "16x16x16", "spee')
    assert train._recorded_teachers(record, train.Config(op="matmul"), ["16x16x16"]) == ({}, {})


def test_a_gpu_schedule_whose_replay_is_cut_short_has_no_replay():
    """Cut short before anything is bound, a CUDA replay renders no kernel: replay says the
    schedule cannot be rebuilt (a teacher search passes it over) instead of raising."""
    op = make_op("matmul", "256x384x128", "bf16")
    target = cuda_target_for_compile()
    expert = experts("matmul", [op.shape_str], target, "bf16")[op.shape_str]
    assert replay(op, expert, target, MAX_STEPS) is not None
    assert replay(op, expert, target, 10) is None


def test_recorded_teachers_are_imitated_on_a_machine_without_the_gpu(tmp_path):
    """`train --teachers FILE --target cuda --timesteps 0`: the learning half of expert
    iteration runs anywhere; the greedy policy rebuilds a recorded teacher, not its expert."""
    from agents.policy import load_policy
    from agents.rollout import PolicyDraw, random_schedules, rollout
    from envs.actions import ActionTable
    from experiments import train

    target = cuda_target_for_compile()
    shapes = family("matmul", "small")
    op = make_op("matmul", shapes[0], "bf16")
    expert = experts("matmul", [shapes[0]], target, "bf16")[shapes[0]]
    teacher = next(s for s in random_schedules(op, 20, np.random.default_rng(0), target=target)
                   if s.key() != expert.key() and replay(op, s, target, MAX_STEPS) is not None)
    record = tmp_path / "found.jsonl"
    record.write_text(json.dumps({"shape": shapes[0], "speedup": 1.3, "schedule": teacher.to_json()}) + "\n")
    out = train.run(train.Config(op="matmul", target="cuda", dtype="bf16", shapes="small", timesteps=0,
                                 teachers=str(record), runs=str(tmp_path)))
    assert out["teachers"] == {shapes[0]: 1.3}
    assert len((Path(out["run_dir"]) / "teachers.jsonl").read_text().splitlines()) == 1
    greedy = rollout(op, ActionTable(op, target), PolicyDraw(load_policy(out["policy"], op, target), deterministic=True))
    assert greedy.schedule.key() == teacher.key() != expert.key()
    with pytest.raises(ValueError, match="no such file"):
        train.run(train.Config(op="matmul", shapes="small", timesteps=0, teachers=str(tmp_path / "none.jsonl"),
                               runs=str(tmp_path)))


def test_a_shape_whose_search_fails_keeps_its_expert_and_the_others_go_on(monkeypatch, caplog):
    """A long teacher search outlives one shape's failure: that shape's expert teaches (the
    failure logged), and the next shape is searched."""
    import agents.imitation
    from agents.imitation import search_teachers

    target = cpu_target()
    found = Schedule(make_op("matmul", "16x16x16")).split("j", 8)

    def search(op, *args):
        if op.shape_str == "24x40x16":
            raise RuntimeError("a bug in one shape's search")
        return found, 1.2

    monkeypatch.setattr(agents.imitation, "_search_teacher", search)
    out = list(search_teachers("matmul", ["24x40x16", "16x16x16"], target, None, None, None, budget=4, seed=0))
    assert out[0][0] == "24x40x16" and out[0][2] == 1.0
    assert out[0][1].key() == experts("matmul", ["24x40x16"], target)["24x40x16"].key()
    assert out[1] == ("16x16x16", found, 1.2)
    assert "teacher search of matmul 24x40x16 failed (RuntimeError: a bug in one shape's search)" in caplog.text
