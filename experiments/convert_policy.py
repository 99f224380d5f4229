"""Convert an old policy (MaskablePPO's pickled .zip) into weights plus a JSON spec.

Loading the .zip unpickles it, and unpickling runs whatever code the file carries:
convert only files you trust (your own runs, policies you made). The result, NEW.pt
(tensors) and NEW.json (what the network is and how it was trained; the old .json
beside the .zip is carried over), loads without unpickling; tune and train accept
only that.

Example:
  python -m experiments convert-policy runs/matmul-cpu-ppo-0-20250101-120000/policy.zip
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path

from agents import policy
from kernels.ir.ops import OPERATORS

from .config import field


@dataclass
class Config:
    path: str = field(help="the old .zip policy; it is unpickled, which can run code: only a file you trust",
                      positional=True, metavar="OLD.zip")
    out: str | None = field(None, help="write NEW.pt and NEW.json (default: beside OLD.zip, same name)",
                            metavar="NEW")
    op: str | None = field(None, help="its operator, if the .json beside it does not say", choices=list(OPERATORS))
    target: str | None = field(None, help="its target, if the .json beside it does not say",
                               choices=["cpu", "cuda"])
    json: bool = field(False, help="print one JSON object as the last line")


def run(cfg: Config) -> dict:
    src = Path(cfg.path)
    if not src.is_file():
        raise FileNotFoundError(f"{src} does not exist")
    if not policy.is_legacy(src):
        raise ValueError(f"{src} is not a MaskablePPO .zip")
    side = src.with_suffix(".json")
    meta = json.loads(side.read_text()) if side.is_file() else {}
    op, target = cfg.op or meta.get("op"), cfg.target or meta.get("target")
    if not op or not target:
        raise ValueError(f"{side} does not say which op and target {src} was trained for; give --op and --target")

    from sb3_contrib import MaskablePPO

    agent = MaskablePPO.load(str(src), device="cpu")  # the one unpickling load, on a file the user trusts
    out = policy.save(agent, cfg.out or src, op, target, **meta)
    print(f"wrote {out} and {out.with_suffix('.json')}")
    return {"policy": str(out), "spec": str(out.with_suffix(".json")), "op": op, "target": target,
            "timesteps": int(agent.num_timesteps)}
