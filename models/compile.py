"""A network with its layers run by the tuned kernels of a database: for deployment.

For each task the database's fastest correct kernel on this machine is built and timed
against torch's own call on the same inputs (alternating blocks, in this process); a
layer keeps torch where torch is faster, or where the database has nothing for it. The
whole model is then checked against the original on random inputs: a model that
disagrees is refused, never returned.
"""

from __future__ import annotations

import statistics
from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import torch
from torch import nn

from kernels.codegen import render
from kernels.ir.dtypes import DEFAULT
from kernels.ir.ops import Operator
from kernels.measure import Measurer
from kernels.measure.library import torch_conv
from kernels.target import Target

from . import database
from .runtime import TORCH_DTYPES, check_outputs, kernel_operator, time_alternating, tuned_module
from .tasks import Network, extract


class CompileError(RuntimeError):
    """The tuned model disagrees with the original one."""


@dataclass
class Layer:
    """One task of the model: what the database had for it and how it compared with torch."""

    op: Operator
    weight: int
    measurements: int = 0          # in the database, for this machine
    ours_ms: float | None = None   # the tuned kernel, in this process
    torch_ms: float | None = None  # torch's call on the same inputs, alternating with it
    used: bool = False             # the model runs the tuned kernel (else torch)
    note: str = ""

    def to_json(self) -> dict:
        return {"op": self.op.kind, "shape": self.op.shape_str, "weight": self.weight,
                "measurements": self.measurements, "ours_ms": self.ours_ms, "torch_ms": self.torch_ms,
                "uses_tuned_kernel": self.used, "note": self.note}


@dataclass
class CompiledModel:
    module: nn.Module                     # the model to run: tuned kernels where they win
    network: Network
    layers: list[Layer] = field(default_factory=list)


def torch_call(op: Operator, t: dict[str, torch.Tensor]) -> Callable[[], object]:
    """What torch runs for ``op`` in a model (the layer it replaces, bias and ReLU included)."""
    if "conv" in op.kind:
        return torch_conv(op, t)
    if op.kind == "dense_bias_relu":
        return lambda: torch.relu_(torch.addmm(t["bias"], t["A"], t["B"]))
    return lambda: torch.matmul(t["A"], t["B"])


def _compare(op: Operator, call: Callable, device: torch.device, rounds: int) -> tuple[float, float]:
    dtype = TORCH_DTYPES[op.dtype]
    inputs = {n: torch.from_numpy(a).view(dtype).to(device)   # bf16 arrives as its bits
              for n, a in op.random_inputs(np.random.default_rng(0)).items()}
    args = [inputs[t.name] for t in op.inputs]
    times = time_alternating({"ours": lambda: call(args), "torch": torch_call(op, inputs)}, device,
                             rounds=rounds, block_s=0.05)
    return statistics.median(times["ours"]), statistics.median(times["torch"])


def compile_model(module: nn.Module, example: tuple[torch.Tensor, ...], measurer: Measurer,
                  dtype: str = DEFAULT, rounds: int = 3, network: Network | None = None,
                  on_layer: Callable[[Layer], None] | None = None) -> CompiledModel:
    """``module`` (already in ``dtype``'s storage type) with the fastest kernels ``measurer``'s
    cache (the database) holds for its tasks in ``dtype``; ``network`` is its trace, if made."""
    target: Target = measurer.target
    device = torch.device("cuda" if target.kind == "cuda" else "cpu")
    net = network or extract(module, example, dtype)
    calls, layers = {}, []
    for op, weight in net.tasks():
        layer = Layer(op, weight, measurements=sum(1 for _ in database.records(measurer.cache, op, target)))
        found = database.best(measurer.cache, op, target)
        if found is None:
            layer.note = "not tuned"
        else:
            kernel = render(found[0], target)
            built = measurer.builder.build([kernel])[0]
            if not built.ok:
                layer.note = f"build failed: {built.error}"
            else:
                call = kernel_operator(kernel, built.path, op)
                layer.ours_ms, layer.torch_ms = _compare(op, call, device, rounds)
                layer.used = layer.ours_ms < layer.torch_ms
                layer.note = "" if layer.used else "torch is faster"
                if layer.used:
                    calls[(op.kind, op.shape_str)] = call
        layers.append(layer)
        if on_layer:
            on_layer(layer)
    tuned = tuned_module(net, calls)
    problem = check_outputs(tuned, module, example, dtype=dtype)
    if problem:
        raise CompileError(f"the tuned model disagrees with the original: {problem}")
    return CompiledModel(tuned, net, layers)
