"""Code generation: a schedule's loop IR rendered as source for one backend.

``render`` picks the backend by ``target.kind``; a new backend is a module here with a
``render_<kind>(schedule, target, name) -> Kernel`` and one entry in ``RENDERERS``.
"""

from __future__ import annotations

from ..ir.schedule import Schedule
from ..target import Target
from .c import render_c
from .cuda import render_cuda
from .kernel import Kernel

RENDERERS = {"cpu": render_c, "cuda": render_cuda}


def render(schedule: Schedule, target: Target, name: str | None = None) -> Kernel:
    """Lower and render ``schedule`` for ``target`` into a callable kernel.

    Rules that depend on the target (GPU binds, thread and shared-memory limits) are
    checked by the backend, where the target is known: a ``ScheduleError`` names the rule.
    """
    if target.kind not in RENDERERS:
        raise ValueError(f"no renderer for target {target.kind!r}; known: {', '.join(RENDERERS)}")
    op = schedule.op
    return RENDERERS[target.kind](schedule, target, name or f"{op.kind}_{'_'.join(map(str, op.shape))}")
