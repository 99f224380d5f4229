"""The cost model's data set: the named shape set, the schedules sampled per shape, and
``costmodel --shape-set``."""

import json

import numpy as np
import pytest

from agents.evolution import legal
from experiments import cli, shapes
from experiments.benchmark import HELDOUT_CASES
from experiments.costmodel import sample_schedules
from kernels.experts import expert_schedule
from kernels.ir.ops import BASE_KIND, OPERATORS, make_op
from kernels.target import cpu_target


def test_the_ranking_set_has_40_shapes_of_every_operator_and_none_held_out():
    pairs = shapes.shape_set("ranking")
    assert len(pairs) >= 40 and len(set(pairs)) == len(pairs)
    assert {op for op, _ in pairs} == set(OPERATORS) - set(BASE_KIND)   # a variant (conv2d_bias_relu) is featurized as its base
    held = {(op, s) for op, fams in shapes.FAMILIES.items() for f in fams.values() for s in f["held_out"]}
    assert not set(pairs) & (held | set(HELDOUT_CASES))
    for op, s in pairs:
        assert make_op(op, s).flops < 2e8     # a slow schedule of it still runs in about a second
    with pytest.raises(ValueError, match="no shape set 'nope'"):
        shapes.shape_set("nope")


def test_samples_are_distinct_legal_reproducible_and_half_near_the_expert():
    op, target = make_op("conv2d", "1,8,10,10,8,3,3,1,1"), cpu_target()
    a = sample_schedules(op, 20, np.random.default_rng(3), 10, target)
    b = sample_schedules(op, 20, np.random.default_rng(3), 10, target)
    assert [s.key() for s in a] == [s.key() for s in b]
    assert len({s.key() for s in a}) == 20
    assert all(legal(op, s.steps, target) is not None for s in a)
    expert = expert_schedule(op, target)
    assert a[0].key() == expert.key()
    near = sum(len(s.steps) == len(expert.steps) and type(s.steps[0]) is type(expert.steps[0]) for s in a)
    assert 5 <= near <= 15   # mutants keep the expert's step count (a drop or an added annotation aside)


def test_cli_shape_set_measures_every_shape(tmp_path, capsys, monkeypatch):
    monkeypatch.setitem(shapes.SHAPE_SETS, "tiny", {"matmul": ["8x8x8"], "depthwise_conv2d": ["1,2,5,5,3,3,1,1"]})
    rc = cli.main(["costmodel", "--shape-set", "tiny", "--per-shape", "3", "--logs-out", str(tmp_path / "data"),
                   "--runs", str(tmp_path / "runs"), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    gen = json.loads(captured.out.strip().splitlines()[-1])["generated"]
    assert [(g["op"], g["schedules"]) for g in gen] == [("matmul", 3), ("depthwise_conv2d", 3)]
    for g in gen:
        assert len((tmp_path / "data").joinpath(g["log"].rsplit("/", 1)[-1]).read_text().splitlines()) == 3
    assert cli.main(["costmodel", "--shape-set", "nope", "--logs-out", str(tmp_path)]) == 2
    assert "no shape set" in capsys.readouterr().err


def test_the_gpu_ranking_set_is_of_gpu_train_shapes_none_held_out_or_compared():
    from experiments.benchmark import HELDOUT_CUDA_CASES
    from kernels.target import cuda_target_for_compile

    pairs = shapes.shape_set("ranking-gpu")
    assert {op for op, _ in pairs} == {"matmul", "conv2d"} and len(set(pairs)) == len(pairs) == 32
    compared = {(op, s) for op, ss in shapes.GPU_DRAWN.items() for s in ss}
    compared |= {c for cases in HELDOUT_CUDA_CASES.values() for c in cases}
    assert not set(pairs) & compared
    assert all(s in shapes.family(op, "train", "gpu-more") for op, s in pairs)
    target = cuda_target_for_compile()
    for op, s in pairs[::8]:
        assert legal(make_op(op, s), expert_schedule(make_op(op, s), target).steps, target) is not None


def _cuda_log(path, kind: str, shape: str, n: int = 12):
    """A GPU tuning log written without a GPU: sampled schedules, times that grow with their steps."""
    from kernels.measure.tuning_log import TuningLog, TuningRecord
    from kernels.target import cuda_target_for_compile

    op = make_op(kind, shape)
    log = TuningLog(path)
    for i, s in enumerate(sample_schedules(op, n, np.random.default_rng(0), 10, cuda_target_for_compile())):
        log.append(TuningRecord(op=kind, shape=op.shape_str, target="cuda", hardware="NVIDIA H200",
                                compiler="NVRTC 13.0", schedule=s.to_json()["steps"],
                                time_ms=0.01 * (1 + len(s.steps) + i % 3), correct=True))
    return path


def test_a_gpu_cost_model_trains_and_ranks_from_logs_without_a_gpu(tmp_path, capsys):
    logs = [str(_cuda_log(tmp_path / "a.jsonl", "matmul", "64x64x64")),
            str(_cuda_log(tmp_path / "b.jsonl", "conv2d", "1,8,10,10,8,3,3,1,1"))]
    model = tmp_path / "cuda.pt"
    rc = cli.main(["costmodel", "--target", "cuda", "--logs", *logs, "--out", str(model), "--epochs", "2",
                   "--runs", str(tmp_path / "runs"), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    assert json.loads(captured.out.strip().splitlines()[-1])["records"] == 24 and model.is_file()
    assert cli.main(["costmodel", "--target", "cuda", "--eval", *logs, "--model", str(model), "--json"]) == 0
    assert 0.0 <= json.loads(capsys.readouterr().out.strip().splitlines()[-1])["pairwise_accuracy"] <= 1.0
    # its records are fp32: a bf16 model has none to learn from
    assert cli.main(["costmodel", "--target", "cuda", "--dtype", "bf16", "--logs", *logs, "--out",
                     str(tmp_path / "bf16.pt"), "--runs", str(tmp_path / "runs")]) == 2
    assert "0 records of target cuda in bf16" in capsys.readouterr().err


def test_measuring_a_gpu_data_set_without_a_gpu_fails_in_one_line_and_writes_nothing(tmp_path, capsys):
    try:
        import cupy  # noqa: F401
        pytest.skip("a GPU machine measures")
    except ImportError:
        pass
    rc = cli.main(["costmodel", "--target", "cuda", "--generate", "matmul:64x64x64:3", "--logs-out",
                   str(tmp_path / "data"), "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "no CUDA GPU" in err[0]
    assert not (tmp_path / "data").exists()
    assert cli.main(["costmodel", "--dtype", "bf16", "--logs", "x.jsonl", "--out", "m.pt"]) == 2
    assert "cuda" in capsys.readouterr().err
