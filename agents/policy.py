"""Policies on disk: network weights plus a JSON spec, never a pickle.

A policy is a pair of files:

- ``NAME.pt``: ``{"policy": state_dict, "optimizer": state_dict}``, written with
  ``torch.save`` and read with ``torch.load(weights_only=True)``, which accepts only
  tensors and plain containers, so reading it cannot run code;
- ``NAME.json``: the spec the network is rebuilt from (op, target, observation size,
  number of actions, architecture, the PPO hyperparameters a resumed training needs,
  timesteps) and how it was trained (hardware, shapes, reward, seed, command).

SB3's own ``.zip`` (``MaskablePPO.save``) unpickles its entries on load, so a shared
one can run any command; it is refused with a pointer to ``convert-policy``, which
converts a file the user trusts.
"""

from __future__ import annotations

import json
import os
import warnings
import zipfile
from pathlib import Path

import numpy as np
from gymnasium import spaces

from envs import features
from envs.actions import ActionTable
from kernels.ir.ops import BASE_KIND, Operator
from kernels.target import Target

FORMAT = "schedgym-policy"
VERSION = 1
# what a spec may set on MaskablePPO: numbers only, so a spec cannot name code
HYPERPARAMETERS = ("n_steps", "batch_size", "n_epochs", "learning_rate", "gamma", "gae_lambda", "clip_range",
                   "ent_coef", "vf_coef", "max_grad_norm")
ACTIVATIONS = ("Tanh", "ReLU", "LeakyReLU", "ELU", "GELU", "SiLU", "Sigmoid")


class PolicyError(ValueError):
    """A policy file that is refused or cannot be rebuilt (one line on the command line)."""


def legacy_message(path: Path) -> str:
    return (f"{path} is an old pickled policy, which could run code when loaded, so it is refused; "
            f"if you trust it, convert it with `python -m experiments convert-policy {path}`")


def spec_of(agent) -> dict:
    """What rebuilds ``agent`` (a MaskablePPO) without its pickles."""
    extra = set(agent.policy_kwargs) - {"net_arch", "activation_fn"}
    if extra:
        raise PolicyError(f"policy_kwargs {sorted(extra)} cannot be written to a spec")
    hyper = {k: getattr(agent, k) for k in HYPERPARAMETERS}
    hyper["learning_rate"] = float(agent.lr_schedule(1.0))  # constant schedules in this project
    hyper["clip_range"] = float(agent.clip_range(1.0))
    return {"format": FORMAT, "version": VERSION,
            "observation_size": int(agent.observation_space.shape[0]), "actions": int(agent.action_space.n),
            "policy_kwargs": {"net_arch": agent.policy.net_arch,
                              "activation_fn": agent.policy.activation_fn.__name__},
            "hyperparameters": hyper, "timesteps": int(agent.num_timesteps)}


def save(agent, path: str | os.PathLike, op_kind: str, target_kind: str, **meta) -> Path:
    """Writes ``path`` (``.pt``, the weights) and the ``.json`` beside it: the spec, then
    ``meta`` (what the spec does not already say)."""
    import torch

    path = Path(path).with_suffix(".pt")
    spec = {"op": op_kind, "target": target_kind, **spec_of(agent)}
    spec.update((k, v) for k, v in meta.items() if k not in spec)
    weights = {"policy": agent.policy.state_dict(), "optimizer": agent.policy.optimizer.state_dict()}
    path.parent.mkdir(parents=True, exist_ok=True)
    _replace(path, lambda tmp: torch.save(weights, tmp))
    _replace(path.with_suffix(".json"), lambda tmp: tmp.write_text(json.dumps(spec, indent=2) + "\n"))
    return path


def _replace(path: Path, write) -> None:
    """Write through a temporary file, so an interrupted save leaves the old file whole."""
    tmp = path.with_name(path.name + f".{os.getpid()}.tmp")
    write(tmp)
    os.replace(tmp, path)


def is_legacy(path: Path) -> bool:
    """An SB3 zip (top-level ``data`` and ``policy.pth``); reading its index runs nothing."""
    try:
        with zipfile.ZipFile(path) as z:
            return {"data", "policy.pth"} <= set(z.namelist())
    except (zipfile.BadZipFile, OSError):
        return False


def read(path: str | os.PathLike, op_kind: str, target_kind: str, n_actions: int) -> tuple[dict, dict]:
    """(spec, weights) of the policy at ``path`` (its ``.pt``, or the ``.json`` beside it),
    checked against the operator, target and action count it is wanted for."""
    import torch

    p = Path(path)
    p = p.with_suffix(".pt") if p.suffix == ".json" else p
    if not p.is_file():
        raise FileNotFoundError(f"policy file {p} does not exist")
    if is_legacy(p):
        raise PolicyError(legacy_message(p))
    side = p.with_suffix(".json")
    try:
        spec = json.loads(side.read_text())
    except (OSError, ValueError) as e:
        raise PolicyError(f"policy {p} needs its spec {side}: {e}") from None
    if not isinstance(spec, dict) or spec.get("format") != FORMAT or spec.get("version") != VERSION:
        raise PolicyError(f"{side} is not a version {VERSION} policy spec")
    if (spec.get("op"), spec.get("target")) not in ((op_kind, target_kind), (BASE_KIND.get(op_kind), target_kind)):
        raise PolicyError(f"policy {p} was trained for {spec.get('op')} on {spec.get('target')}, "
                          f"not {op_kind} on {target_kind}")
    if spec.get("actions") != n_actions or spec.get("observation_size") != features.SIZE:
        raise PolicyError(f"policy {p} has {spec.get('actions')} actions and observations of "
                          f"{spec.get('observation_size')}; {op_kind} on {target_kind} needs {n_actions} and "
                          f"{features.SIZE} (retrain it: python -m experiments train --op {op_kind} "
                          f"--target {target_kind})")
    try:
        with warnings.catch_warnings():  # torch's notes on odd pickles: the error below says it all
            warnings.simplefilter("ignore")
            weights = torch.load(p, map_location="cpu", weights_only=True)
    except Exception as e:  # weights_only refuses anything but tensors before running it
        raise PolicyError(f"policy {p} is not a plain tensor file; refused without running anything in it "
                          f"({type(e).__name__})") from None
    if not isinstance(weights, dict) or not isinstance(weights.get("policy"), dict):
        raise PolicyError(f"policy {p} holds no policy weights")
    return spec, weights


def _section(spec: dict, key: str) -> dict:
    value = spec.get(key, {})
    if not isinstance(value, dict):
        raise PolicyError(f"the spec's {key} is not a JSON object")
    return value


def _policy_kwargs(spec: dict) -> dict:
    """The spec's architecture (layer sizes) and activation (a name from a short list)."""
    import torch

    kw = _section(spec, "policy_kwargs")
    arch = kw.get("net_arch", [])
    layers = list(arch.values()) if isinstance(arch, dict) and set(arch) <= {"pi", "vf"} else [arch]
    if (set(kw) - {"net_arch", "activation_fn"} or kw.get("activation_fn", "Tanh") not in ACTIVATIONS
            or not all(isinstance(l, list) and all(type(n) is int and n > 0 for n in l) for l in layers)):
        raise PolicyError(f"unsupported policy_kwargs in spec: {kw}")
    return {**kw, "activation_fn": getattr(torch.nn, kw.get("activation_fn", "Tanh"))}


def _hyperparameters(spec: dict) -> dict:
    hyper = _section(spec, "hyperparameters")
    bad = {k: v for k, v in hyper.items()
           if k not in HYPERPARAMETERS or isinstance(v, bool) or not isinstance(v, (int, float))}
    if bad:
        raise PolicyError(f"unsupported hyperparameters in spec: {bad}")
    return hyper


def _load_weights(module, state: dict, what: str) -> None:
    try:
        module.load_state_dict(state)
    except (RuntimeError, ValueError, KeyError, TypeError) as e:
        raise PolicyError(f"{what} do not fit the network its spec describes "
                          f"({str(e).splitlines()[0]})") from None


def new_agent(env, hyperparameters: dict, policy_kwargs: dict | None = None, seed: int = 0):
    """A fresh MaskablePPO with an MLP policy on ``env`` (a vectorised ScheduleEnv)."""
    from sb3_contrib import MaskablePPO

    return MaskablePPO("MlpPolicy", env, policy_kwargs=policy_kwargs, seed=seed, device="cpu", verbose=0,
                       **hyperparameters)


def load_agent(path: str | os.PathLike, env, op_kind: str, target_kind: str, seed: int = 0,
               hyperparameters: dict | None = None):
    """A MaskablePPO on ``env`` with the saved weights, optimizer state and timesteps, to
    train further; with ``hyperparameters``, a new run that starts from the saved weights
    alone (its own learning rate and the like, a fresh optimizer, no timesteps)."""
    spec, weights = read(path, op_kind, target_kind, int(env.action_space.n))
    agent = new_agent(env, hyperparameters or _hyperparameters(spec), _policy_kwargs(spec), seed)
    _load_weights(agent.policy, weights["policy"], f"the weights of {path}")
    if hyperparameters is None:
        if "optimizer" in weights:
            _load_weights(agent.policy.optimizer, weights["optimizer"], f"the optimizer state of {path}")
        agent.num_timesteps = int(spec.get("timesteps", 0))
    return agent


def load_policy(path: str | os.PathLike, op: Operator, target: Target):
    """The policy network alone (``predict(obs, action_masks=, deterministic=)``), for
    rolling out schedules of ``op``."""
    from sb3_contrib.common.maskable.policies import MaskableActorCriticPolicy

    spec, weights = read(path, op.kind, target.kind, len(ActionTable(op, target)))
    obs_space = spaces.Box(0.0, features.HIGH, (features.SIZE,), np.float32)  # the env's
    policy = MaskableActorCriticPolicy(obs_space, spaces.Discrete(spec["actions"]),
                                       lambda _: 0.0,  # its optimizer is never used here
                                       **_policy_kwargs(spec))
    _load_weights(policy, weights["policy"], f"the weights of {path}")
    policy.set_training_mode(False)
    return policy
