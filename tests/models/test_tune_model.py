"""tune-model and apply end to end on a tiny network, the database's reuse and separation."""

from __future__ import annotations

import json

import pytest
import torch

from experiments.cli import main
from kernels.codegen import render
from kernels.experts import expert_schedule
from kernels.ir.ops import make_op
from kernels.measure.build import Builder
from kernels.measure.tuning_log import TuningLog
from kernels.target import cpu_target
from models.runtime import kernel_operator

TINY = '''
import torch
from torch import nn

class Tiny(nn.Module):
    def __init__(self):
        super().__init__()
        self.c1 = nn.Conv2d(3, 8, 3, padding=1)
        self.c2 = nn.Conv2d(8, 8, 3, stride=2, padding=1, bias=False)
        self.shortcut = nn.Conv2d(8, 8, 1, stride=2)
        self.fc = nn.Linear(8 * 4 * 4, 10)

    def forward(self, x):
        x = torch.relu(self.c1(x))
        return self.fc(torch.flatten(self.c2(x) + self.shortcut(x), 1))

def build():
    torch.manual_seed(0)
    return Tiny(), torch.randn(2, 3, 8, 8)
'''


@pytest.fixture
def tiny(tmp_path):
    path = tmp_path / "tiny.py"
    path.write_text(TINY)
    return f"{path}:build"


def _run(capsys, *args) -> dict:
    assert main(list(args)) == 0
    return json.loads(capsys.readouterr().out.strip().splitlines()[-1])


def test_tune_rebuild_check_and_reuse(capsys, tmp_path, tiny):
    db, runs = str(tmp_path / "db.jsonl"), str(tmp_path / "runs")
    common = ["--model", tiny, "--database", db, "--runs", runs, "--rounds", "1", "--json"]
    first = _run(capsys, "tune-model", *common, "--budget", "6")
    assert first["correct"] and first["tasks"] == 4 and first["measurements"] == 6
    assert {(t["op"], t["shape"]) for t in first["layers"]} == {
        ("conv2d_bias_relu", "2,3,8,8,8,3,3,1,1"), ("conv2d", "2,8,8,8,8,3,3,2,1"),
        ("conv2d", "2,8,4,4,8,1,1,1,0"), ("matmul", "2x10x128")}      # the 1x1 shortcut, subsampled
    assert sum(t["measurements"] for t in first["layers"]) == 6
    assert all(t["ours_ms"] is not None for t in first["layers"])    # each task got its first measurement
    for key in ("model_ms", "torch_ms", "speedup_vs_torch", "tune_wall_s", "folded_ms", "speedup_vs_folded"):
        assert first[key] > 0
    run_dir = tmp_path / "runs" / first["run_dir"].split("/")[-1]
    assert (run_dir / "time.png").stat().st_size > 0
    assert json.loads((run_dir / "summary.json").read_text())["layers"] == first["layers"]

    again = _run(capsys, "tune-model", *common, "--budget", "6")
    assert again["correct"] and again["measurements"] == 0        # all in the database
    more = _run(capsys, "tune-model", *common, "--budget", "8")
    assert more["measurements"] == 2                              # only what the larger budget adds

    applied = _run(capsys, "apply", "--model", tiny, "--database", db, "--runs", runs, "--rounds", "1", "--json")
    assert applied["correct"] and applied["measurements"] == 0 and applied["tasks"] == 4


def test_the_database_is_never_reused_on_another_machine(capsys, tmp_path, tiny):
    db = tmp_path / "db.jsonl"
    common = ["--model", tiny, "--database", str(db), "--runs", str(tmp_path / "runs"), "--rounds", "1", "--json"]
    _run(capsys, "tune-model", *common, "--budget", "4")
    lines = [json.loads(line) for line in db.read_text().splitlines()]
    db.write_text("".join(json.dumps({**r, "hardware": "another CPU"}) + "\n" for r in lines))
    applied = _run(capsys, "apply", *common)
    assert all(t["measurements"] == 0 and not t["uses_tuned_kernel"] for t in applied["layers"])
    assert len(TuningLog(db).read()) == 4    # kept, only not used here


def test_a_kernel_operator_refuses_tensors_it_would_overrun():
    op = make_op("matmul", "8x8x8")
    kernel = render(expert_schedule(op, cpu_target()), cpu_target())
    call = kernel_operator(kernel, Builder().build([kernel])[0].path, op)
    a, b = torch.randn(8, 8), torch.randn(8, 8)
    assert torch.allclose(call([a, b]), a @ b, atol=1e-5)
    with pytest.raises(ValueError, match="inputs of shapes"):
        call([torch.randn(4, 8), b])
    with pytest.raises(ValueError, match="contiguous fp32"):
        call([a.t(), b])


@pytest.mark.parametrize("args, why", [
    (["--model", "resnet1000"], "unknown model"),
    (["--model", "resnet18", "--database", "."], "is a directory"),
    (["--model", "resnet18", "--dtype", "bf16"], "dtype bf16 runs on cuda only"),
    (["--model", "resnet18", "--rounds", "0"], "--rounds"),
])
def test_bad_input_is_one_line_before_any_work(capsys, tmp_path, args, why):
    assert main(["tune-model", *args, "--runs", str(tmp_path / "runs")]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and why in err[0]
    assert not (tmp_path / "runs").exists()



@pytest.mark.parametrize("dtype", ["fp32", "bf16"])
def test_tune_and_run_on_a_gpu(capsys, tmp_path, tiny, dtype):
    pytest.importorskip("cupy")
    if not torch.cuda.is_available():
        pytest.skip("no CUDA device for torch")
    result = _run(capsys, "tune-model", "--model", tiny, "--target", "cuda", "--dtype", dtype,
                  "--database", str(tmp_path / "db.jsonl"), "--runs", str(tmp_path / "runs"), "--rounds", "1",
                  "--budget", "5", "--json")
    assert result["correct"] and result["target"] == "cuda" and result["dtype"] == dtype
    assert result["measurements"] == 5 and all(t["ours_ms"] is not None for t in result["layers"])
