"""Policy files a user is handed run no code: old pickled ones are refused by tune and
train with one line saying how to convert them, and convert-policy converts them."""

from __future__ import annotations

import dataclasses
import json
from pathlib import Path

import pytest

from agents import policy
from agents.rollout import PolicyDraw, rollout
from envs.actions import ActionTable
from experiments import train, tune
from experiments.cli import main
from kernels.ir.ops import make_op
from kernels.target import cpu_target, cuda_target_for_compile


def refused(capsys, *argv: str) -> str:
    """The one error line of a command that must fail."""
    assert main(list(argv)) == 2
    lines = capsys.readouterr().err.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("error:"), lines
    return lines[0]


def run_dir(path: Path, config) -> Path:
    path.mkdir()
    (path / "config.json").write_text(json.dumps(dataclasses.asdict(config)))
    return path


def test_tune_refuses_an_old_zip_policy(capsys, hostile, tmp_path):
    old = hostile.zip(tmp_path / "matmul-ppo.zip")
    assert "convert-policy" in refused(capsys, "tune", "--op", "matmul", "--shape", "8x8x8", "--policy", str(old),
                                       "--runs", str(tmp_path / "runs"))
    assert not hostile.marker.exists() and not (tmp_path / "runs").exists()


def test_tune_resume_refuses_the_old_zip_its_config_names(capsys, hostile, tmp_path):
    old = hostile.zip(tmp_path / "matmul-ppo.zip")
    d = run_dir(tmp_path / "run", tune.Config(op="matmul", shape="8x8x8", policy=str(old)))
    assert "convert-policy" in refused(capsys, "tune", "--op", "matmul", "--shape", "8x8x8", "--resume", str(d))
    assert not hostile.marker.exists()


@pytest.mark.parametrize("name, kind", [("policy.zip", "zip"), ("policy.pt", "pickle")])
def test_train_resume_refuses_a_pickled_policy(capsys, hostile, small_agent, tmp_path, name, kind):
    d = run_dir(tmp_path / "run", train.Config(op="matmul", shapes="small"))
    if kind == "pickle":  # a valid spec beside it, so only the weights file is at fault
        policy.save(small_agent, d / "policy.pt", "matmul", "cpu")
    getattr(hostile, kind)(d / name)
    line = refused(capsys, "train", "--op", "matmul", "--resume", str(d), "--timesteps", "8")
    assert ("convert-policy" if kind == "zip" else "not a plain tensor file") in line
    assert not hostile.marker.exists()
    assert not list(d.glob("events.out.tfevents.*")), "the run directory was written to"


def test_convert_policy_keeps_the_actions(capsys, small_agent, tmp_path):
    old = tmp_path / "old.zip"
    small_agent.save(str(old))
    old.with_suffix(".json").write_text(json.dumps({"op": "matmul", "target": "cpu", "seed": 3}))
    assert main(["convert-policy", str(old), "--out", str(tmp_path / "new")]) == 0
    assert json.loads((tmp_path / "new.json").read_text())["seed"] == 3
    target = cpu_target()
    for shape in ("16x24x8", "96x64x128"):
        op = make_op("matmul", shape)
        loaded = policy.load_policy(tmp_path / "new.pt", op, target)
        assert rollout(op, ActionTable(op), PolicyDraw(loaded, deterministic=True)).actions == \
            rollout(op, ActionTable(op), PolicyDraw(small_agent, deterministic=True)).actions


def test_convert_policy_says_it_unpickles_and_needs_the_op(capsys, small_agent, tmp_path):
    with pytest.raises(SystemExit):
        main(["convert-policy", "--help"])
    assert "trust" in capsys.readouterr().out
    small_agent.save(str(tmp_path / "old.zip"))
    assert "--op and --target" in refused(capsys, "convert-policy", str(tmp_path / "old.zip"))


def test_every_shipped_policy_and_cost_model_loads():
    """The shipped files fit the current observation and action tables (a change of
    either means retraining them)."""
    from agents.cost_model import LearnedCostModel
    from experiments import pretrained
    from experiments.shapes import family
    from kernels.target import cuda_target_for_compile

    targets = {"cpu": cpu_target(), "cuda": cuda_target_for_compile()}
    policies = sorted(pretrained.ROOT.glob("*/*-ppo.pt"))
    assert {p.stem for p in policies if p.parent.name == "cpu"} == \
        {f"{k}-ppo" for k in ("matmul", "conv2d", "batch_matmul", "dense_bias_relu", "depthwise_conv2d")}
    for path in policies:
        kind, _, dtype = path.stem.removesuffix("-ppo").partition("-")
        op = make_op(kind, family(kind, "small")[0], dtype or "fp32")
        assert pretrained.policy_path(op, path.parent.name) == path   # each is the one its dtype finds
        policy.load_policy(path, op, targets[path.parent.name])
    for path in pretrained.ROOT.glob("*/cost_model.pt"):
        LearnedCostModel.load(path, targets[path.parent.name])
    # a dtype without a policy of its own takes one whose schedules are alike, else the fp32 one
    assert pretrained.policy_path(make_op("matmul", "64x64x64", "fp16"), "cuda").name == "matmul-bf16-ppo.pt"
    # fp32 takes tf32's instruction, but split in three: its own policy
    assert pretrained.policy_path(make_op("matmul", "64x64x64"), "cuda").name == "matmul-ppo.pt"
    assert pretrained.policy_path(make_op("conv2d", "1,16,8,8,16,3,3", "fp16"), "cuda").name == "conv2d-bf16-ppo.pt"
    assert pretrained.policy_path(make_op("conv2d", "1,16,8,8,16,3,3", "tf32"), "cuda").name == "conv2d-tf32-ppo.pt"
    assert pretrained.policy_path(make_op("depthwise_conv2d", "1,16,8,8,3,3", "fp16"), "cpu").name == \
        "depthwise_conv2d-ppo.pt"
    assert pretrained.policy_path(make_op("matmul", "64x64x64"), "cuda").name == "matmul-ppo.pt"


def test_train_imitates_for_cuda_without_a_gpu(tmp_path):
    """Imitation measures nothing: without a GPU it trains for an H200's description."""
    from kernels.target import NoCudaDevice, cuda_target

    try:
        cuda_target()
        pytest.skip("a GPU is here")
    except NoCudaDevice:
        pass
    out = train.run(train.Config(op="matmul", target="cuda", shapes="small", timesteps=0, imitation_epochs=2,
                                 width=32, runs=str(tmp_path)))
    spec = json.loads(Path(out["policy"]).with_suffix(".json").read_text())
    assert spec["target"] == "cuda" and spec["hardware"] == "compile-only sm_90" and spec["timesteps"] == 0
    assert spec["policy_kwargs"]["net_arch"] == {"pi": [32, 32], "vf": [32, 32]}   # --width
    op = make_op("matmul", "16x16x16")
    assert policy.load_policy(out["policy"], op, cuda_target_for_compile()) is not None
    for measuring in (dict(timesteps=8), dict(timesteps=0, teacher_budget=4)):
        with pytest.raises(NoCudaDevice):
            train.run(train.Config(op="matmul", target="cuda", shapes="small", runs=str(tmp_path), **measuring))
