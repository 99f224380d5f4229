"""The action table and its mask, without measuring anything."""

from __future__ import annotations

import numpy as np
import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from envs.actions import FACTORS, MAX_LOOPS, Action, ActionTable, NestInfo, factor_allowed, factor_for
from experiments.shapes import family
from kernels.ir.ops import OPERATORS, make_op
from kernels.ir.schedule import Schedule, ScheduleError

OPS = tuple(OPERATORS)

# split 13 x 8, tile 12 x 8, swap 12, fuse 12, vectorize/unroll/parallel/cache_write 13
# each, cache_read 13 per operand, done
TABLE_SIZE = MAX_LOOPS * len(FACTORS) + (MAX_LOOPS - 1) * len(FACTORS) + 2 * (MAX_LOOPS - 1) \
    + 4 * MAX_LOOPS + 2 * MAX_LOOPS + 1


@pytest.mark.parametrize("op", OPS)
def test_table_size_is_the_same_for_every_shape(op):
    sizes = {len(ActionTable(make_op(op, s))) for s in family(op, "small")}
    assert sizes == {TABLE_SIZE}


def test_table_layout_matches_the_docstring():
    table = ActionTable(make_op("matmul", "16x16x16"))
    counts: dict[str, int] = {}
    for a in table.actions:
        counts[a.primitive] = counts.get(a.primitive, 0) + 1
    assert counts == {"split": 117, "tile": 108, "swap": 12, "fuse": 12, "vectorize": 13, "unroll": 13,
                      "parallel": 13, "cache_write": 13, "cache_read": 26, "done": 1}
    assert table.actions[table.done].primitive == "done" and table.done == len(table) - 1
    assert {a.tensor for a in table.actions if a.primitive == "cache_read"} == {"A", "B"}


@pytest.mark.parametrize("extent", range(1, 130))
def test_each_distinct_factor_has_exactly_one_slot(extent):
    factors = [factor_for(extent, f) for f in range(len(FACTORS)) if factor_allowed(extent, f)]
    assert len(factors) == len(set(factors))
    assert all(1 <= f <= extent for f in factors)
    assert set(factors) == {f for f in FACTORS if f <= extent} | ({extent} if extent <= 64 else set())


def test_actions_for_rejects_a_factor_outside_the_table():
    op = make_op("matmul", "16x16x16")
    with pytest.raises(ScheduleError, match="factor 5"):
        ActionTable(op).actions_for(Schedule(op).split("i", 5))


def test_to_step_rejects_a_slot_the_nest_does_not_have():
    op = make_op("matmul", "16x16x16")   # three loops: i, j, k
    table, nest = ActionTable(op), Schedule(op).nest
    with pytest.raises(ScheduleError, match="3 loops"):
        table.to_step(table.index[Action("vectorize", 3)], nest)
    with pytest.raises(ScheduleError, match="3 loops"):
        table.to_step(table.index[Action("swap", 2)], nest)
    assert table.to_step(table.done, nest) is None


@settings(max_examples=150, derandomize=True, deadline=None, database=None,
          suppress_health_check=[HealthCheck.too_slow])
@given(op=st.sampled_from(OPS), data=st.data(), seed=st.integers(0, 2**32 - 1),
       p_done=st.floats(0.0, 0.1))
def test_every_allowed_action_applies(op, data, seed, p_done):
    """Along random masked rollouts, every action the mask allows applies without
    ScheduleError, and done is always allowed."""
    shape = data.draw(st.sampled_from(family(op, "small")), label="shape")
    operator = make_op(op, shape)
    table = ActionTable(operator)
    schedule = Schedule(operator)
    rng = np.random.default_rng(seed)
    for _ in range(31):
        mask = table.mask(NestInfo(operator, schedule.nest))
        assert mask.shape == (len(table),) and mask.dtype == bool
        assert mask[table.done]
        allowed = [int(a) for a in np.flatnonzero(mask) if a != table.done]
        for a in allowed:
            try:
                schedule.apply(table.to_step(a, schedule.nest))
            except ScheduleError as e:
                pytest.fail(f"{op} {shape}: the mask allows {table.actions[a]} on\n{schedule}\n"
                            f"steps {schedule.key()}\nbut applying it raises {e}")
        if not allowed or rng.random() < p_done:
            break
        schedule = schedule.apply(table.to_step(int(rng.choice(allowed)), schedule.nest))
