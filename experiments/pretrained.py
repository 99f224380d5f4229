"""Policies and cost models shipped with the repository, and loading user-given ones.

``experiments/pretrained/<target>/<op>-ppo.pt`` and ``<op>-ppo.json`` are a policy:
its weights and the spec it is rebuilt from (``agents/policy.py``), which also says
what it was trained for and by which command (``<op>-<dtype>-ppo.pt``: one for a dtype
other than fp32, whose schedules differ: tensor cores); ``experiments/pretrained/<target>/cost_model.pt``
is a cost model pre-trained from tuning logs (``cost_model-<dtype>.pt``: one for another
dtype). The observation does not name the dtype: a policy serves every dtype whose
tensor-core instruction and element size match those it was trained for (bf16's serves fp16).
"""

from __future__ import annotations

from pathlib import Path

from kernels.ir.dtypes import DTYPES
from kernels.ir.ops import BASE_KIND, Operator
from kernels.target import Target

ROOT = Path(__file__).resolve().parent / "pretrained"


def _schedules_alike(a: str, b: str) -> bool:
    """Whether dtypes ``a`` and ``b`` build the same schedules: the same tensor-core
    instruction (or none), used alike (fp32's is split in three), on elements of the same
    size, so the same legal actions."""
    return all(getattr(DTYPES[a], f) == getattr(DTYPES[b], f) for f in ("mma_k", "split", "bytes"))


def policy_path(op: Operator, target_kind: str) -> Path:
    """The shipped policy's file: the dtype's own where one is shipped, else that of a
    dtype whose schedules are alike (fp16 takes bf16's), else the fp32 one; an epilogue
    variant uses its base operator's."""
    base = BASE_KIND.get(op.kind, op.kind)
    for dtype in sorted(DTYPES, key=lambda d: d != op.dtype):   # its own first
        path = ROOT / target_kind / f"{base}-{dtype}-ppo.pt"
        if dtype != "fp32" and _schedules_alike(dtype, op.dtype) and path.is_file():
            return path
    return ROOT / target_kind / f"{base}-ppo.pt"


def cost_model_path(target_kind: str, dtype: str = "fp32") -> Path:
    """The shipped cost model of a target: ``cost_model.pt`` for fp32, ``cost_model-<dtype>.pt``
    for another dtype (its kernels, on tensor cores, are another population)."""
    return ROOT / target_kind / ("cost_model.pt" if dtype == "fp32" else f"cost_model-{dtype}.pt")


def load_policy(path: str | None, op: Operator, target: Target):
    """The given policy, else the one shipped for ``op`` on ``target``."""
    from agents import policy

    if not path and not policy_path(op, target.kind).is_file():
        raise FileNotFoundError(f"no policy shipped for {op.kind} on {target.kind}; train one with "
                                f"`python -m experiments train --op {op.kind}` and pass --policy")
    return policy.load_policy(path or policy_path(op, target.kind), op, target)


def shipped_policy(op: Operator, target: Target):
    """The policy shipped for ``op`` on ``target``, or None where none is shipped."""
    return load_policy(None, op, target) if policy_path(op, target.kind).is_file() else None


def load_cost_model(path: str | None, target: Target, seed: int = 0, dtype: str = "fp32"):
    """The given cost model, else the one shipped for the target and dtype, else a fresh
    (untrained) one."""
    from agents.cost_model import LearnedCostModel

    if path:
        return LearnedCostModel.load(path, target=target)
    shipped = cost_model_path(target.kind, dtype)
    if shipped.is_file():
        return LearnedCostModel.load(shipped, target=target)
    return LearnedCostModel(target=target, seed=seed)
