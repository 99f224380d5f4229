"""Run directories: ``runs/<op>-<target>-<agent>-<seed>-<time>/`` (tune, train) and
``runs/costmodel-<target>-<arch>-<seed>-<time>/`` (costmodel).

Each holds the TensorBoard event files and the hyperparameters (``config.json`` and a
text table in TensorBoard). A tune or train run also holds the tuning log
(``tuning.jsonl``) and the progress curve (``progress.jsonl``: one line per measured
point, the step being the hardware measurements so far); tune ends with
``summary.json`` and the best kernel, costmodel with ``metrics.json``. Every agent
logs the same scalars with the number of hardware measurements as the step, so
``tensorboard --logdir runs`` overlays them.
"""

from __future__ import annotations

import dataclasses
import json
import time
from pathlib import Path
from typing import Any


def new_run_dir(root: str, *name: Any) -> Path:
    """A fresh ``root/<name parts joined by ->-<time>/``, e.g. (op, target, agent, seed)."""
    stamp = time.strftime("%Y%m%d-%H%M%S")
    base = "-".join(str(part) for part in (*name, stamp))
    path = Path(root) / base
    n = 1
    while path.exists():
        n += 1
        path = Path(root) / f"{base}-{n}"
    path.mkdir(parents=True)
    return path


def save_config(run_dir: Path, cfg: Any, writer=None) -> None:
    d = dataclasses.asdict(cfg)
    (run_dir / "config.json").write_text(json.dumps(d, indent=2) + "\n")
    if writer is not None:
        table = "|param|value|\n|-|-|\n" + "\n".join(f"|{k}|{v}|" for k, v in d.items())
        writer.add_text("hyperparameters", table)


def load_config(run_dir: Path) -> dict:
    path = Path(run_dir) / "config.json"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} is not a run directory (no config.json)")
    saved = json.loads(path.read_text())
    if not isinstance(saved, dict):
        raise ValueError(f"{path} is not a JSON object")
    return saved


def resumed_config(cfg: Any, keep: tuple[str, ...], identity: tuple[str, ...] = ("op",)) -> Any:
    """The config saved in ``cfg.resume``, with the fields in ``keep`` that the command line
    gives (not None) taken from it. Fields in ``identity`` (the op, the shape) may be left
    out; given, they must match the run's. A run directory is data: only known settings
    are read, and a run of another command is refused."""
    saved = load_config(Path(cfg.resume))
    command = type(cfg).__module__.rsplit(".", 1)[-1]
    names = {f.name for f in dataclasses.fields(cfg)}
    unknown = sorted(set(saved) - names)
    if unknown:
        raise ValueError(f"{cfg.resume} is not a {command} run (its config.json has settings {command} "
                         f"does not know: {', '.join(unknown)})")
    for name in identity:
        given = getattr(cfg, name)
        if given is not None and given != saved.get(name):
            raise ValueError(f"--{name} {given} is not the run's ({saved.get(name)}); leave it out to resume "
                             f"{cfg.resume}")
    overrides = {k: getattr(cfg, k) for k in ("resume", *keep) if getattr(cfg, k) is not None}
    try:
        return type(cfg)(**{**saved, **overrides})
    except TypeError as e:
        raise ValueError(f"{cfg.resume}/config.json is incomplete ({e})") from None


class ProgressLog:
    """``progress.jsonl`` plus TensorBoard scalars, one point per hardware measurement."""

    def __init__(self, run_dir: Path, writer=None, append: bool = False):
        self.path = Path(run_dir) / "progress.jsonl"
        self.writer = writer
        if not append:
            self.path.write_text("")

    def add(self, step: int, **scalars: float) -> None:
        with self.path.open("a") as f:
            f.write(json.dumps({"measurements": step, **scalars}) + "\n")
        if self.writer is not None:
            for name, value in scalars.items():
                self.writer.add_scalar(name, value, step)


def read_progress(run_dir: Path) -> list[dict]:
    path = Path(run_dir) / "progress.jsonl"
    if not path.is_file():
        raise FileNotFoundError(f"{run_dir} has no progress.jsonl (not a tune or train run?)")
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]
