"""Observation features: the vectors stay what they were, and the layout is the tables'."""

from __future__ import annotations

import json
import math
import re
from dataclasses import replace
from pathlib import Path

import numpy as np

from envs.actions import MAX_LOOPS, NestInfo
from envs.features import (GLOBAL, GLOBAL_FEATURES, GLOBAL_WIDTH, LOOP, LOOP_FEATURES, LOOP_WIDTH, OP_KINDS, ROWS,
                           SIZE, featurize)
from envs.schedule_env import ScheduleEnv
from kernels.ir.ops import make_op
from kernels.ir.schedule import Schedule
from kernels.target import Target, cpu_target, cuda_target_for_compile

GOLDEN = Path(__file__).parent / "data" / "features_golden.npz"
# the machines the vectors were recorded for: fixed, so the test does not depend on this one
TARGETS = {"cpu": Target("cpu", "Intel Xeon, 2 cores, AVX-512", 2, 16, "gcc 12", l1_bytes=48 << 10,
                         l2_bytes=1280 << 10, l3_bytes=48 << 20),
           "cuda": replace(cuda_target_for_compile("sm_90"), shared_bytes_per_block=48 << 10)}


def _golden():
    with np.load(GOLDEN, allow_pickle=False) as data:
        return json.loads(str(data["cases"])), data["vectors"]


def test_vectors_are_bit_identical_to_the_recorded_ones():
    """154 schedules (naive, expert, random and half-built ones of every op, a small and a
    train shape, CPU and CUDA) featurized by the implementation with literal column
    offsets; any change of layout or value shows here."""
    cases, vectors = _golden()
    assert len(cases) == len(vectors) > 100
    for case, want in zip(cases, vectors):
        s = Schedule.from_json({"op": case["op"], "shape": case["shape"], "steps": case["steps"]})
        got = featurize(s.op, NestInfo(s.op, s.nest), TARGETS[case["target"]], case["step_fraction"])
        assert got.dtype == want.dtype and got.tobytes() == want.tobytes(), case


def test_columns_are_laid_out_as_the_tables_say():
    for table, columns, width in ((LOOP_FEATURES, LOOP, LOOP_WIDTH), (GLOBAL_FEATURES, GLOBAL, GLOBAL_WIDTH)):
        assert list(columns) == [name for name, _ in table]
        at = 0
        for name, w in table:      # contiguous, in table order, as wide as the table says
            assert columns[name] == slice(at, at + w), name
            at += w
        assert at == width
    assert ROWS == MAX_LOOPS * LOOP_WIDTH and SIZE == ROWS + GLOBAL_WIDTH


def test_named_columns_hold_their_feature():
    op = make_op("matmul", "16x32x8")
    s = Schedule(op).split("j", 8).reorder("k", "j_i").vectorize("j_i").cache_write("j_o")
    target = cpu_target()
    obs = featurize(op, NestInfo(op, s.nest), target, 0.25)
    rows, g = obs[:ROWS].reshape(MAX_LOOPS, LOOP_WIDTH), obs[ROWS:]
    names = [l.name for l in s.nest.loops]
    assert rows[:len(names), LOOP["present"]].ravel().tolist() == [1.0] * len(names)
    assert not rows[len(names):].any()
    j_i = names.index("j_i")
    assert rows[j_i, LOOP["kind"]].tolist() == [0, 0, 1, 0]                  # vectorize
    assert rows[j_i, LOOP["log_extent"]] == np.float32(math.log2(9))
    assert rows[names.index("k"), LOOP["reduce"]] == 1.0
    assert rows[names.index("j_o"), LOOP["anchor"]].tolist() == [1, 0, 0]     # cache_write at j_o
    assert g[GLOBAL["op_kind"]].tolist() == [float(k == "matmul") for k in OP_KINDS]
    assert g[GLOBAL["step_fraction"]] == 0.25
    assert g[GLOBAL["has"]].tolist() == [0, 1, 1, 0]


def test_each_double_buffer_step_shows():
    """A pipelined stage's anchor shows its buffers: each double_buffer changes the
    observation (else a policy cannot tell how deep the pipeline already is, and its
    greedy episodes stopped one double_buffer short of the expert's)."""
    from kernels.experts import expert_schedule
    from kernels.ir.schedule import DoubleBuffer
    target = TARGETS["cuda"]
    expert = expert_schedule(make_op("matmul", "512x512x512"), target)
    assert any(isinstance(x, DoubleBuffer) for x in expert.steps)
    seen = []
    for k in range(len(expert.steps) + 1):
        s = Schedule(expert.op, expert.steps[:k])
        if k and isinstance(expert.steps[k - 1], DoubleBuffer):
            seen.append(featurize(s.op, NestInfo(s.op, s.nest), target, 0.5).tobytes())
    before = Schedule(expert.op, [x for x in expert.steps if not isinstance(x, DoubleBuffer)])
    seen.append(featurize(before.op, NestInfo(before.op, before.nest), target, 0.5).tobytes())
    assert len(set(seen)) == len(seen)


def test_the_target_is_described():
    """Cores, lanes and caches (a GPU's limits) enter log-scaled; a CPU has no GPU columns."""
    op = make_op("matmul", "16x32x8")
    info = NestInfo(op, Schedule(op).nest)
    cpu, gpu = TARGETS["cpu"], TARGETS["cuda"]
    g = featurize(op, info, cpu, 0.0)[ROWS:]
    assert g[GLOBAL["log_cache_bytes"]].tolist() == [np.float32(math.log2(1 + b)) for b in (48 << 10, 1280 << 10, 48 << 20)]
    assert not g[GLOBAL["log_shared_bytes"]].any() and not g[GLOBAL["log_registers"]].any()
    g = featurize(op, info, gpu, 0.0)[ROWS:]
    assert g[GLOBAL["log_cores"]] == np.float32(math.log2(133))
    assert g[GLOBAL["log_registers"]].tolist() == [np.float32(math.log2(65537))] * 2
    assert g[GLOBAL["log_shared_bytes"]] == np.float32(math.log2(1 + (48 << 10)))


def test_the_env_spec_sheet_lists_the_features():
    """ScheduleEnv's docstring table: one row per feature, with its width, in order."""
    doc = ScheduleEnv.__doc__.split("**Observation**")[1].split("**Reward**")[0]
    rows = re.findall(r"^\s{4}([a-z_]+)(?: \(global\))?\s+(\d+)\s", doc, re.M)
    assert [(name, int(w)) for name, w in rows] == list(LOOP_FEATURES + GLOBAL_FEATURES)
