"""Run a PyTorch model with the kernels of a tuning database, without tuning: for deployment.

Each layer takes the database's fastest kernel on this machine where it beats torch's
call (timed alternating, in this process); the model is checked against the original on
random inputs and timed against it, as at the end of ``tune-model``. In Python::

    from kernels.measure import Measurer
    from kernels.target import get_target
    from models.compile import compile_model
    with Measurer(get_target("cpu"), log="~/.cache/schedgym/tuning.jsonl") as m:
        tuned = compile_model(module, (example,), m).module

Examples:
  python -m experiments apply --model resnet18
  python -m experiments apply --model my_net.py:build --database runs/tuning.jsonl --json
"""

from __future__ import annotations

from dataclasses import dataclass

from .tune_model import ModelChoice, _save, prepare, report


@dataclass
class Config(ModelChoice):
    pass


def run(cfg: Config) -> dict:
    from kernels.measure import Measurer

    name, module, example, target, db = prepare(cfg)
    if not db.is_file():
        raise ValueError(f"no tuning database at {db}; tune with `python -m experiments tune-model` first")
    with Measurer(target, log=db) as measurer:
        summary = report(cfg, name, module, example, measurer)
    summary.update(measurements=0)
    _save(summary)
    return summary
