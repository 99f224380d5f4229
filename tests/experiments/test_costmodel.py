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
