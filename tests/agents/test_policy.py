"""Policies are saved as weights plus a JSON spec and loaded without unpickling."""

from __future__ import annotations

import contextlib
import json
from pathlib import Path

import pytest
import torch
from sb3_contrib import MaskablePPO

from agents import policy
from agents.rollout import PolicyDraw, rollout
from envs.actions import ActionTable
from kernels.ir.ops import make_op
from kernels.target import cpu_target

SHAPES = ("16x24x8", "64x48x32", "100x200x300")
CPU_ACTIONS = len(ActionTable(make_op("matmul", "8x8x8"), cpu_target()))


def greedy(pol, shape: str) -> list[int]:
    op = make_op("matmul", shape)
    return rollout(op, ActionTable(op, cpu_target()), PolicyDraw(pol, deterministic=True)).actions


@pytest.fixture
def saved(small_agent, tmp_path):
    return policy.save(small_agent, tmp_path / "matmul-ppo.pt", "matmul", "cpu", seed=0, command="test")


def test_round_trip_gives_the_same_actions(small_agent, saved):
    assert saved.with_suffix(".json").is_file()
    loaded = policy.load_policy(saved, make_op("matmul", "32x32x32"), cpu_target())
    for shape in SHAPES:
        assert greedy(loaded, shape) == greedy(small_agent, shape)
    op = make_op("matmul", "64x48x32")
    torch.manual_seed(1)
    sampled = [rollout(op, ActionTable(op), PolicyDraw(small_agent, deterministic=False)).actions
               for _ in range(3)]
    torch.manual_seed(1)
    assert [rollout(op, ActionTable(op), PolicyDraw(loaded, deterministic=False)).actions
            for _ in range(3)] == sampled


def test_resumed_agent_keeps_weights_optimizer_and_hyperparameters(small_agent, saved):
    agent = policy.load_agent(saved, small_agent.get_env(), "matmul", "cpu")
    for a, b in zip(small_agent.policy.state_dict().values(), agent.policy.state_dict().values()):
        assert torch.equal(a, b)
    assert agent.policy.optimizer.state_dict()["param_groups"] == \
        small_agent.policy.optimizer.state_dict()["param_groups"]
    assert (agent.n_steps, agent.batch_size, agent.num_timesteps) == (8, 8, small_agent.num_timesteps)
    spec = json.loads(saved.with_suffix(".json").read_text())
    assert spec["command"] == "test" and spec["actions"] == CPU_ACTIONS and spec["op"] == "matmul"


def test_wrong_op_target_or_sizes_are_refused(saved):
    with pytest.raises(policy.PolicyError, match="trained for matmul on cpu, not conv2d"):
        policy.read(saved, "conv2d", "cpu", CPU_ACTIONS)
    with pytest.raises(policy.PolicyError, match=f"has {CPU_ACTIONS} actions"):
        policy.read(saved, "matmul", "cpu", 300)
    with pytest.raises(FileNotFoundError, match="does not exist"):
        policy.read(saved.with_name("nope.pt"), "matmul", "cpu", CPU_ACTIONS)
    spec = json.loads(saved.with_suffix(".json").read_text())
    spec["policy_kwargs"]["net_arch"] = [32]
    saved.with_suffix(".json").write_text(json.dumps(spec))
    with pytest.raises(policy.PolicyError, match="do not fit"):
        policy.load_policy(saved, make_op("matmul", "8x8x8"), cpu_target())


def test_an_old_zip_is_refused_unread(hostile, tmp_path):
    old = hostile.zip(tmp_path / "policy.zip")
    with pytest.raises(policy.PolicyError, match="convert-policy") as e:
        policy.load_policy(old, make_op("matmul", "8x8x8"), cpu_target())
    assert "\n" not in str(e.value)
    assert not hostile.marker.exists()


def test_the_crafted_zip_runs_its_payload_when_unpickled(hostile, tmp_path):
    """What the refusals guard against: MaskablePPO.load runs the payload."""
    with contextlib.suppress(Exception):
        MaskablePPO.load(str(hostile.zip(tmp_path / "policy.zip")), device="cpu")
    assert hostile.marker.exists()


@pytest.mark.parametrize("kind", ["pickle", "torch_file"])
def test_a_pt_that_needs_unpickling_is_refused_unrun(kind, saved, hostile):
    getattr(hostile, kind)(saved)
    with pytest.raises(policy.PolicyError, match="not a plain tensor file") as e:
        policy.load_policy(saved, make_op("matmul", "8x8x8"), cpu_target())
    assert "\n" not in str(e.value)
    assert not hostile.marker.exists()


def test_the_shipped_cuda_policy_fits_the_cuda_table():
    from kernels.target import cuda_target_for_compile

    op = make_op("matmul", "512x512x512")
    target = cuda_target_for_compile()
    path = Path(__file__).resolve().parents[2] / "experiments" / "pretrained" / "cuda" / "matmul-ppo.pt"
    gpu_actions = len(ActionTable(op, target))
    spec, _ = policy.read(path, "matmul", "cuda", gpu_actions)
    assert spec["actions"] == gpu_actions > CPU_ACTIONS
    with pytest.raises(policy.PolicyError, match=rf"has {gpu_actions} actions .* needs {CPU_ACTIONS} .* \(retrain it"):
        policy.read(path, "matmul", "cuda", CPU_ACTIONS)
