"""Random legal schedules, drawn through the environment's action table and mask.

``by="action"`` draws uniformly among the allowed actions (``done`` included), which
is what a random policy does; splits and tiles then outnumber everything else
(a matmul's initial nest allows ~60 actions, one of them ``vectorize`` at most, and
only when the innermost loop is spatial). ``by="primitive"`` first draws a primitive
uniformly among those with an allowed action, then one of its actions, so
annotations (vectorize, parallel, unroll, caches) appear as often as structure.
"""

from __future__ import annotations

import numpy as np

from envs.actions import ActionTable, NestInfo
from kernels.ir.ops import Operator
from kernels.ir.schedule import Schedule

SAMPLING = ("action", "primitive")


def _draw(table: ActionTable, allowed: np.ndarray, rng: np.random.Generator, by: str) -> int:
    if by == "action":
        return int(allowed[rng.integers(len(allowed))])
    prims = sorted({table.actions[a].primitive for a in allowed})
    prim = prims[rng.integers(len(prims))]
    of_prim = [a for a in allowed if table.actions[a].primitive == prim]
    return int(of_prim[rng.integers(len(of_prim))])


def random_schedule(op: Operator, rng: np.random.Generator, max_steps: int = 10,
                    table: ActionTable | None = None, by: str = "action") -> Schedule:
    """One schedule: allowed actions drawn (see the module doc for ``by``) until ``done``
    or ``max_steps`` steps."""
    if by not in SAMPLING:
        raise ValueError(f"unknown sampling {by!r}; use one of {', '.join(SAMPLING)}")
    table = table or ActionTable(op)
    s = Schedule(op)
    for _ in range(max_steps):
        a = _draw(table, np.flatnonzero(table.mask(NestInfo(op, s.nest))), rng, by)
        if a == table.done:
            break
        s = s.apply(table.to_step(a, s.nest))
    return s


def random_schedules(op: Operator, n: int, rng: np.random.Generator, max_steps: int = 10,
                     by: str = "action", unique: bool = True,
                     max_tries: int | None = None) -> list[Schedule]:
    """``n`` random schedules of ``op``, distinct by steps when ``unique`` (fewer only when
    ``max_tries`` draws, default ``20 * n``, do not find that many)."""
    table = ActionTable(op)
    out: list[Schedule] = []
    seen: set[str] = set()
    for _ in range(max_tries if max_tries is not None else 20 * n):
        if len(out) >= n:
            break
        s = random_schedule(op, rng, max_steps, table, by)
        if unique:
            k = s.key()
            if k in seen:
                continue
            seen.add(k)
        out.append(s)
    return out
