import dataclasses
import json
import math
from pathlib import Path

import numpy as np
import pytest

from agents.cost_model import (CostModelConfig, CostModelError, LearnedCostModel, cross_validate_by_shape,
                               pairwise_accuracy_of, records_from_logs, split, to_samples, top_k_recall_of)
from agents.rollout import random_schedules
from experiments import cli
from kernels.measure import Builder, MeasureResult, Measurer, Runner
from kernels.ir.ops import make_op
from kernels.ir.schedule import Parallel, Schedule, Unroll, Vectorize
from envs.features import SIZE
from kernels.target import cpu_target
from kernels.measure.tuning_log import TuningLog, TuningRecord

TRAIN_SHAPES = ["16x16x16", "64x48x32"]
UNSEEN_SHAPE = "24x40x8"


def synthetic_time(s: Schedule) -> float:
    """Seconds: fewer annotations are slower; the scale follows the FLOPs."""
    n = sum(isinstance(step, (Vectorize, Parallel, Unroll)) for step in s.steps)
    return s.op.flops * 1e-9 / (1 + n)


def synthetic(shape: str, n: int, seed: int) -> list[tuple[Schedule, float]]:
    op = make_op("matmul", shape)
    scheds = random_schedules(op, n, np.random.default_rng(seed), max_steps=8, by="primitive")
    return [(s, synthetic_time(s)) for s in scheds]


def record(s: Schedule, time_ms: float, correct: bool = True, target: str = "cpu") -> TuningRecord:
    return TuningRecord(op=s.op.kind, shape=s.op.shape_str, target=target, hardware=cpu_target().device,
                        compiler="gcc", schedule=s.steps_json(), time_ms=time_ms, correct=correct,
                        error=None if correct else "wrong result")


@pytest.fixture(scope="module")
def data():
    return [p for i, shape in enumerate(TRAIN_SHAPES) for p in synthetic(shape, 100, i)]


@pytest.fixture(scope="module")
def trained(data):
    model = LearnedCostModel(seed=0)
    metrics = model.fit(data, epochs=25, holdout=0.2, seed=0)
    return model, metrics


# ---------------------------------------------------------------- metrics

def test_metrics_on_known_orders():
    y = np.log([1.0, 2.0, 3.0, 4.0, 1.0, 5.0])
    groups = [("matmul", "a", "h")] * 4 + [("matmul", "b", "h")] * 2
    assert pairwise_accuracy_of(y, y, groups) == 1.0
    assert pairwise_accuracy_of(-y, y, groups) == 0.0
    assert pairwise_accuracy_of(np.zeros(6), y, groups) == 0.5
    assert top_k_recall_of(y, y, groups, 2) == 1.0
    assert top_k_recall_of(-y, y, groups, 2) == 0.5   # group b has only 2: k caps at its size
    assert math.isnan(pairwise_accuracy_of(np.zeros(2), np.zeros(2), [("m", "a", "h")] * 2))


def test_split_by_schedule_and_by_shape(data):
    samples = to_samples(data, "h")
    train, held = split(samples, 0.2, 0, "schedule")
    assert len(held) == 40 and {s.group for s in held} == {s.group for s in train}
    train, held = split(samples, 0.2, 0, "shape")
    assert held and not {s.group for s in held} & {s.group for s in train}


# ---------------------------------------------------------------- learning

def test_ranks_held_out_schedules(trained):
    _, metrics = trained
    assert metrics["held_out"] == 40 and metrics["groups"] == 2
    assert metrics["pairwise_accuracy"] > 0.8
    assert metrics["top_k_recall"] > 0.3


def test_predicts_unseen_shape(trained):
    model, _ = trained
    unseen = synthetic(UNSEEN_SHAPE, 60, 7)
    pred = model.predict([s for s, _ in unseen])
    assert pred.shape == (60,) and np.all(np.isfinite(pred))
    assert model.pairwise_accuracy(unseen) > 0.8
    conv = random_schedules(make_op("conv2d", "1,4,8,8,8,3,3,1,1"), 5, np.random.default_rng(0))
    assert np.all(np.isfinite(model.predict(conv)))


def test_by_shape_cross_validation(data):
    res = cross_validate_by_shape(data, CostModelConfig(seed=0), epochs=10)
    assert res["folds"] == 2 and 0 <= res["pairwise_accuracy"] <= 1


def test_deterministic_given_seed(data):
    preds = []
    for _ in range(2):
        m = LearnedCostModel(seed=5)
        m.update(data[:40])
        m.update(data[100:140])
        preds.append(m.predict([s for s, _ in data]))
    np.testing.assert_array_equal(*preds)


def test_update_skips_failures_and_accepts_every_record_form(data):
    m = LearnedCostModel(seed=0)
    (s1, t1), (s2, t2), (s3, _), (s4, _) = data[:4]
    ok = MeasureResult(True, t2 * 1e3, (t2 * 1e3,), 1.0, True, None)
    m.update([(s1, t1), (s2, ok), (s3, MeasureResult.failure("timeout")), (s4, math.inf),
              record(s4, math.inf, correct=False), record(s3, 5.0, correct=False)])
    assert len(m.data) == 2
    m.update([record(s3, 5.0), record(s4, 2.0, target="cuda")])   # the model does not filter targets
    assert len(m.data) == 4
    m.update([])
    assert len(m.data) == 4


def test_predict_returns_log_seconds_on_a_plausible_scale(trained, data):
    model, _ = trained
    pred = model.predict([s for s, _ in data])
    true = np.log([t for _, t in data])
    assert abs(np.median(pred - true)) < 2.0
    assert model.predict([]).shape == (0,)


# ---------------------------------------------------------------- persistence

def test_an_ensemble_averages_its_members_and_round_trips(data, tmp_path):
    model = LearnedCostModel(ensemble=3, seed=0)
    model.learn(to_samples(data[:60], cpu_target().device), epochs=2)
    scheds = [s for s, _ in data[:20]]
    x = model._tensors(model.features(scheds))
    members = [m(*x).detach().numpy() for m in model.net.members]
    assert not np.allclose(members[0], members[1])          # different initial weights
    np.testing.assert_allclose(model.score(scheds), np.mean(members, 0), rtol=1e-5, atol=1e-6)
    model.save(tmp_path / "e.pt")
    np.testing.assert_array_equal(LearnedCostModel.load(tmp_path / "e.pt").predict(scheds), model.predict(scheds))


def test_save_load_round_trip(trained, data, tmp_path):
    model, _ = trained
    path = tmp_path / "m.pt"
    model.save(path)
    loaded = LearnedCostModel.load(path)
    scheds = [s for s, _ in data] + [s for s, _ in synthetic(UNSEEN_SHAPE, 10, 9)]
    np.testing.assert_array_equal(model.predict(scheds), loaded.predict(scheds))
    assert loaded.config == model.config
    loaded.update(data[:10])      # a loaded model keeps learning


def test_load_errors(tmp_path):
    with pytest.raises(FileNotFoundError, match="no cost model"):
        LearnedCostModel.load(tmp_path / "missing.pt")
    bad = tmp_path / "bad.pt"
    bad.write_bytes(b"\x00garbage" * 10)
    with pytest.raises(CostModelError, match="not a readable cost model"):
        LearnedCostModel.load(bad)
    import torch
    torch.save({"something": 1}, tmp_path / "other.pt")
    with pytest.raises(CostModelError, match="not a cost model"):
        LearnedCostModel.load(tmp_path / "other.pt")
    m = LearnedCostModel()
    m.save(tmp_path / "ok.pt")
    state = torch.load(tmp_path / "ok.pt", weights_only=True)
    del state["weights"]
    torch.save(state, tmp_path / "broken.pt")
    with pytest.raises(CostModelError, match="incomplete"):
        LearnedCostModel.load(tmp_path / "broken.pt")


def test_a_file_from_before_the_nest_columns_and_ensembles_loads_as_it_was(tmp_path, data):
    import torch

    old = LearnedCostModel(nest_features=False, ensemble=1)
    old.learn(to_samples(data[:40], cpu_target().device), epochs=2)
    old.save(tmp_path / "old.pt")
    state = torch.load(tmp_path / "old.pt", weights_only=True)
    del state["config"]["nest_features"], state["config"]["ensemble"]     # as such a file was written:
    state["weights"] = {k.removeprefix("members.0."): v for k, v in state["weights"].items()}  # one bare net
    torch.save(state, tmp_path / "old.pt")
    loaded = LearnedCostModel.load(tmp_path / "old.pt")
    assert not loaded.config.nest_features and loaded.config.ensemble == 1 and loaded.width == SIZE
    scheds = [s for s, _ in data[:20]]
    np.testing.assert_array_equal(old.predict(scheds), loaded.predict(scheds))


def test_nest_columns_of_an_expert_with_tails(monkeypatch):
    """matmul 33x65x129's expert as packed for larger B: j_o (3) parallel on 2 cores, i split
    by 8 and j by 32 with tails (40 of 33 and 96 of 65 iterations run), an 8x32 unrolled and
    vectorized body accumulated in an 8x32 tile under i_o, B packed under j_o (129x32)."""
    from agents.cost_model.features import NEST_GLOBAL_FEATURES, NEST_LOOP_FEATURES, NEST_LOOP_WIDTH, nest_features
    from envs.actions import MAX_LOOPS, NestInfo
    from kernels import experts
    from kernels.experts import expert_schedule

    monkeypatch.setattr(experts, "SMALL_B_BYTES", 0)   # not the small product's row-parallel kernel

    # this project's CPU: the expert's parallel loop and the core fill follow the cores
    target, op = dataclasses.replace(cpu_target(), cores=2, vector_lanes=16), make_op("matmul", "33x65x129")
    nest = expert_schedule(op, target).nest
    assert [(l.name, l.extent, l.kind) for l in nest.loops] == [
        ("j_o", 3, "parallel"), ("i_o", 5, "serial"), ("k", 129, "serial"), ("i_i", 8, "unroll"),
        ("j_i", 32, "vectorize")]
    assert nest.cache_write == "i_o" and nest.cache_reads == (("B", "j_o"),)
    x = nest_features(NestInfo(op, nest), target)
    rows = dict(zip(NEST_LOOP_FEATURES, x[:MAX_LOOPS * NEST_LOOP_WIDTH].reshape(MAX_LOOPS, -1)[:5].T))
    glob = dict(zip(NEST_GLOBAL_FEATURES, x[MAX_LOOPS * NEST_LOOP_WIDTH:]))
    assert list(rows["guarded"]) == [1, 1, 0, 1, 1]
    assert rows["core_fill"][0] == pytest.approx(3 / 4) and rows["lane_fill"][4] == 1.0
    assert rows["log_inner"][4] == pytest.approx(math.log2(33))
    assert rows["log_inner"][0] == pytest.approx(math.log2(1 + 3 * 5 * 129 * 8 * 32))
    assert rows["log_bytes"][4] == pytest.approx(math.log2(1 + 4 * (32 + 1 + 32)))   # a row of C and of B, one A
    assert glob["log_padding"] == pytest.approx(math.log2(40 / 33 * 96 / 65))
    assert glob["log_body"] == pytest.approx(math.log2(257))
    assert glob["log_tile"] == pytest.approx(math.log2(257)) and glob["log_packed"] == pytest.approx(math.log2(1 + 129 * 32))


def test_gpu_fill_columns_are_the_grids_last_wave_and_the_blocks_last_warp():
    """On a GPU the fill of a bound loop is the whole grid's over the multiprocessors (1400
    blocks run in 11 waves of 132: 1400 of 1452 slots) and the whole block's over warps (3 x 7
    threads: 21 of 32 lanes), not one loop's extent over the CPU's cores."""
    from agents.cost_model.features import NEST_LOOP_FEATURES, NEST_LOOP_WIDTH, nest_features
    from envs.actions import MAX_LOOPS, NestInfo
    from kernels.ir.schedule import Schedule
    from kernels.target import target_or_description

    target, op = target_or_description("cuda"), make_op("matmul", "300x96x8")
    assert target.cores == 132
    steps = [{"step": "Split", "loop": "i", "factor": 3}, {"step": "Split", "loop": "j", "factor": 7},
             {"step": "Reorder", "order": ["i_o", "j_o", "i_i", "j_i", "k"]},
             {"step": "Bind", "loop": "i_o", "thread_axis": "blockIdx.y"},
             {"step": "Bind", "loop": "j_o", "thread_axis": "blockIdx.x"},
             {"step": "Bind", "loop": "i_i", "thread_axis": "threadIdx.y"},
             {"step": "Bind", "loop": "j_i", "thread_axis": "threadIdx.x"}]
    nest = Schedule.from_json({"steps": steps}, op).nest
    assert [(l.extent, l.kind) for l in nest.loops] == [
        (100, "bind:blockIdx.y"), (14, "bind:blockIdx.x"), (3, "bind:threadIdx.y"), (7, "bind:threadIdx.x"),
        (8, "serial")]
    x = nest_features(NestInfo(op, nest), target)
    fill = x[:MAX_LOOPS * NEST_LOOP_WIDTH].reshape(MAX_LOOPS, -1)[:5, NEST_LOOP_FEATURES.index("core_fill")]
    assert fill == pytest.approx([1400 / 1452, 1400 / 1452, 21 / 32, 21 / 32, 0.0])


# ---------------------------------------------------------------- logs

def test_records_from_logs_skips_corrupt_lines_and_other_targets(tmp_path, data, caplog):
    log = tmp_path / "t.jsonl"
    tl = TuningLog(log)
    for s, t in data[:6]:
        tl.append(record(s, t * 1e3))
    tl.append(record(data[6][0], 1.0, target="cuda"))
    with open(log, "a") as f:
        f.write('{"op": "matmul", "shape": \n')
        f.write("not json at all\n")
    recs = records_from_logs([log])
    assert len(recs) == 6 and all(r.target == "cpu" for r in recs)
    assert "corrupt" in caplog.text
    with pytest.raises(FileNotFoundError, match="not found"):
        records_from_logs([tmp_path / "nope.jsonl"])


def test_fit_without_usable_records_raises(data):
    s = data[0][0]
    with pytest.raises(ValueError, match="no usable records"):
        LearnedCostModel().fit([record(s, math.inf, correct=False)])


def test_tensorboard_scalars(data, tmp_path):
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    LearnedCostModel(seed=0).fit(data, epochs=4, log_dir=tmp_path / "tb", eval_every=2)
    acc = EventAccumulator(str(tmp_path / "tb"))
    acc.Reload()
    tags = set(acc.Tags()["scalars"])
    assert {"cost_model/loss", "cost_model/pairwise_accuracy", "cost_model/top_k_recall"} <= tags
    assert [e.step for e in acc.Scalars("cost_model/loss")] == [2, 4]


# ---------------------------------------------------------------- ranking for the agents

def test_rank_is_stable_and_cut_at_k(monkeypatch):
    model = LearnedCostModel(seed=0)
    scheds = random_schedules(make_op("matmul", "16x16x16"), 6, np.random.default_rng(0), max_steps=4)
    monkeypatch.setattr(model, "predict", lambda schedules: np.array([3.0, 1.0, 2.0, 1.0, 5.0, 1.0]))
    assert model.rank(scheds, 4) == [1, 3, 5, 2]
    assert model.rank(scheds, 0) == [] and model.rank([], 3) == []
    assert model.rank(scheds) == model.rank(scheds, 10) == [1, 3, 5, 2, 0, 4]


@pytest.fixture(scope="module")
def measurer(tmp_path_factory):
    builder = Builder(cache_dir=tmp_path_factory.mktemp("build"))
    with Measurer(cpu_target(), builder=builder,
                  runner=Runner(repeats=1, min_time_s=0.0, timeout_s=30)) as m:
        yield m


# ---------------------------------------------------------------- the command

@pytest.fixture(scope="module")
def measured_log(measurer, tmp_path_factory):
    """A real tuning log: 24 random schedules of a small matmul, measured."""
    op = make_op("matmul", "32x32x32")
    scheds = random_schedules(op, 24, np.random.default_rng(0), max_steps=6, by="primitive")
    path = tmp_path_factory.mktemp("logs") / "tuning.jsonl"
    measurer.log = TuningLog(path)
    try:
        res = measurer.measure(scheds)
    finally:
        measurer.log = None
    assert sum(r.ok for r in res) >= 10
    return path


def test_cli_end_to_end(measured_log, tmp_path, capsys):
    out = tmp_path / "model.pt"
    rc = cli.main(["costmodel", "--logs", str(measured_log), "--out", str(out), "--epochs", "5",
                   "--top-k", "3", "--runs", str(tmp_path / "runs"), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert {"records", "groups", "pairwise_accuracy", "top_k_recall", "out"} <= set(res)
    assert res["groups"] == 1 and res["records"] >= 10 and res["out"] == str(out)
    assert 0 <= res["pairwise_accuracy"] <= 1 and res["predict_per_s"] > 0
    assert "pairwise acc" in captured.out
    run_dir = Path(res["run_dir"])      # like tune and train: config, metrics, TensorBoard events
    assert run_dir.parent == tmp_path / "runs" and run_dir.name.startswith("costmodel-cpu-set-0-")
    assert json.loads((run_dir / "config.json").read_text())["epochs"] == 5
    assert json.loads((run_dir / "metrics.json").read_text())["pairwise_accuracy"] == res["pairwise_accuracy"]
    assert list(run_dir.glob("events.out.tfevents.*"))
    model = LearnedCostModel.load(out)
    assert np.all(np.isfinite(model.predict(random_schedules(make_op("matmul", "8x8x8"), 3,
                                                               np.random.default_rng(0)))))


def test_cli_eval_reports_the_accuracy_of_a_model(measured_log, tmp_path, capsys):
    """--eval trains nothing: the shipped model by default, or --model, on given logs."""
    rc = cli.main(["costmodel", "--eval", str(measured_log), "--json"])
    captured = capsys.readouterr()
    assert rc == 0, captured.err
    res = json.loads(captured.out.strip().splitlines()[-1])
    assert res["model"].endswith("pretrained/cpu/cost_model.pt") and res["records"] >= 10
    assert 0 <= res["pairwise_accuracy"] <= 1 and 0 <= res["top10_recall"] <= 1
    one = tmp_path / "one.jsonl"
    one.write_text(measured_log.read_text().splitlines()[0] + "\n")
    assert cli.main(["costmodel", "--eval", str(one)]) == 2
    assert "nothing to rank" in capsys.readouterr().err
    assert cli.main(["costmodel", "--eval", str(measured_log), "--model", str(tmp_path / "no.pt")]) == 2
    assert "does not exist" in capsys.readouterr().err


@pytest.mark.parametrize("content, message", [
    ("", "no usable records"),
    ("garbage\n{\"also\": \"bad\"}\n", "no usable records"),
])
def test_cli_empty_or_corrupt_log_is_one_line_error(tmp_path, capsys, content, message):
    log = tmp_path / "empty.jsonl"
    log.write_text(content)
    rc = cli.main(["costmodel", "--logs", str(log), "--out", str(tmp_path / "m.pt"), "--runs", str(tmp_path / "runs")])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and err[-1].startswith("error: ") and message in err[-1]
    assert not (tmp_path / "m.pt").exists() and not (tmp_path / "runs").exists()


def test_cli_missing_log_and_missing_out(tmp_path, capsys):
    assert cli.main(["costmodel", "--logs", str(tmp_path / "nope.jsonl"), "--out", str(tmp_path / "m.pt")]) == 2
    assert "not found" in capsys.readouterr().err
    assert cli.main(["costmodel", "--logs", str(tmp_path / "nope.jsonl")]) == 2
    assert "--out" in capsys.readouterr().err
    assert cli.main(["costmodel", "--generate", "matmul:8x8x8"]) == 2
    assert "--logs-out" in capsys.readouterr().err
