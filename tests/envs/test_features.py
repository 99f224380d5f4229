"""Observation features: the vectors stay what they were, and the layout is the tables'."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from envs.actions import NestInfo
from envs.features import featurize
from kernels.ir.schedule import Schedule
from kernels.target import cpu_target, cuda_target_for_compile

GOLDEN = Path(__file__).parent / "data" / "features_golden.npz"
TARGETS = {"cpu": cpu_target(), "cuda": cuda_target_for_compile("sm_90")}


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
