"""Policies and cost models shipped with the repository, and loading user-given ones.

``experiments/pretrained/<target>/<op>-ppo.zip`` is a MaskablePPO policy with a
sidecar ``.json`` saying what it was trained for and by which command;
``experiments/pretrained/<target>/cost_model.pt`` is a cost model pre-trained
from tuning logs.
"""

from __future__ import annotations

import json
from pathlib import Path

from kernels.ir.ops import Operator
from kernels.target import Target

ROOT = Path(__file__).resolve().parent / "pretrained"


def policy_path(op_kind: str, target_kind: str) -> Path:
    return ROOT / target_kind / f"{op_kind}-ppo.zip"


def cost_model_path(target_kind: str) -> Path:
    return ROOT / target_kind / "cost_model.pt"


def policy_meta(path: Path) -> dict:
    side = Path(path).with_suffix(".json")
    return json.loads(side.read_text()) if side.is_file() else {}


def load_policy(path: str | None, op: Operator, target: Target):
    """A MaskablePPO policy for ``op``; a clear error when it is missing or was trained
    for another operator or target."""
    from sb3_contrib import MaskablePPO

    from envs.actions import ActionTable
    from envs.features import SIZE

    p = Path(path) if path else policy_path(op.kind, target.kind)
    if not p.is_file():
        if path:
            raise FileNotFoundError(f"policy file {p} does not exist")
        raise FileNotFoundError(f"no policy shipped for {op.kind} on {target.kind}; train one with "
                                f"`python -m experiments train --op {op.kind}` and pass --policy")
    meta = policy_meta(p)
    if meta.get("op", op.kind) != op.kind or meta.get("target", target.kind) != target.kind:
        raise ValueError(f"policy {p} was trained for {meta.get('op')} on {meta.get('target')}, "
                         f"not {op.kind} on {target.kind}")
    try:
        policy = MaskablePPO.load(str(p), device="cpu")
    except Exception as e:  # a zip that is not a policy
        raise ValueError(f"cannot load policy {p}: {e}") from None
    n_actions = len(ActionTable(op, target))
    if policy.action_space.n != n_actions or policy.observation_space.shape != (SIZE,):
        raise ValueError(f"policy {p} has {policy.action_space.n} actions and observations of "
                         f"{policy.observation_space.shape}; {op.kind} needs {n_actions} and ({SIZE},)")
    return policy


def load_cost_model(path: str | None, target: Target, seed: int = 0):
    """The given cost model, else the shipped one, else a fresh (untrained) one."""
    from agents.cost_model import LearnedCostModel

    if path:
        return LearnedCostModel.load(path, target=target)
    shipped = cost_model_path(target.kind)
    if shipped.is_file():
        return LearnedCostModel.load(shipped, target=target)
    return LearnedCostModel(target=target, seed=seed)
