"""Tuned kernels inside a torch model.

Each kernel becomes a torch custom operator (``torch.library``, ``schedgym::<op>_<digest>``):
on the CPU the compiled ``.so`` is called through ctypes, on a GPU the CUDA source is
compiled by NVRTC (CuPy) and launched on torch's current stream. The operator checks
the shapes, dtype, device and layout of what it is given before the kernel runs, since
a kernel indexes its buffers without bounds checks. Layers of the traced network are
then swapped for modules that call these operators (:func:`tuned_module`).
"""

import ctypes
import copy
import statistics
import time
from typing import Callable

import numpy as np
import torch
from torch import fx, nn

from kernels.codegen.kernel import Kernel
from kernels.ir.ops import Operator
from kernels.measure.timing import time_calls

from .tasks import Network, Site

_LIBRARY = torch.library.Library("schedgym", "FRAGMENT")   # our operators' namespace in torch.ops
_REGISTERED: dict[str, Callable] = {}   # custom operators by name, each registered once a process
TORCH_DTYPES = {"fp32": torch.float32, "tf32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}


def _cpu_launcher(kernel: Kernel, path: str) -> Callable[[list[torch.Tensor]], None]:
    fn = getattr(ctypes.CDLL(path), kernel.name)
    fn.restype = None
    fn.argtypes = [ctypes.c_void_p] * len(kernel.args)
    return lambda tensors: fn(*(t.data_ptr() for t in tensors))


def _cuda_launcher(kernel: Kernel, path: str) -> Callable[[list[torch.Tensor]], None]:
    from kernels.measure.cuda_worker import _cupy, compile_kernel
    cp = _cupy()
    fn = compile_kernel(kernel.source, kernel.name, kernel.shared_bytes)
    grid, block = kernel.launch

    streams: dict[int, object] = {}   # CuPy's view of each torch stream, made once

    def launch(tensors: list[torch.Tensor]) -> None:
        ptr = torch.cuda.current_stream().cuda_stream
        if ptr not in streams:
            streams[ptr] = cp.cuda.ExternalStream(ptr)
        # raw pointers as 64-bit scalars: wrapping each tensor as a CuPy array costs
        # more than the launch of a small layer's kernel
        fn(grid, block, tuple(np.uint64(t.data_ptr()) for t in tensors), stream=streams[ptr],
           shared_mem=kernel.shared_bytes)
    return launch


def kernel_operator(kernel: Kernel, path: str, op: Operator) -> Callable[[list[torch.Tensor]], torch.Tensor]:
    """``call([inputs...]) -> output``: the kernel as a torch custom operator.

    Registered through ``torch.library.Library`` (a schema, an implementation for the CPU
    and CUDA dispatch keys, a fake for tracing) rather than ``torch.library.custom_op``,
    whose Python wrapper costs about 90 us a call: more than a small layer's kernel."""
    name = f"{op.kind}_{kernel.digest}"
    if name in _REGISTERED:
        return _REGISTERED[name]
    launch = (_cuda_launcher if kernel.is_cuda else _cpu_launcher)(kernel, path)
    shapes = [tuple(t.shape) for t in op.inputs]
    out_shape = tuple(op.output.shape)
    dtype = TORCH_DTYPES[op.dtype]

    def impl(inputs: list[torch.Tensor]) -> torch.Tensor:
        if [tuple(t.shape) for t in inputs] != shapes:
            raise ValueError(f"{op.kind} {op.shape_str} kernel takes inputs of shapes {shapes}, "
                             f"got {[tuple(t.shape) for t in inputs]}")
        device = inputs[0].device
        if any(t.dtype != dtype or not t.is_contiguous() or t.device != device for t in inputs):
            raise ValueError(f"{op.kind} {op.shape_str} kernel takes contiguous {op.dtype} tensors on one device")
        if (device.type == "cuda") != kernel.is_cuda:
            raise ValueError(f"a {'CUDA' if kernel.is_cuda else 'CPU'} kernel was given tensors on {device}")
        out = torch.empty(out_shape, dtype=dtype, device=device)
        launch([*inputs, out])
        return out

    _LIBRARY.define(f"{name}(Tensor[] inputs) -> Tensor")
    for key in ("CPU", "CUDA"):    # either way round is refused by impl in one clear line
        _LIBRARY.impl(name, impl, key)
    torch.library.register_fake(f"schedgym::{name}", lambda inputs: inputs[0].new_empty(out_shape), lib=_LIBRARY)
    call = _REGISTERED[name] = getattr(torch.ops.schedgym, name).default
    return call


# ---------------------------------------------------------------- layers

class TunedConv(nn.Module):
    """A convolution (depthwise too) by a tuned kernel; a bias the kernel does not
    take (``conv2d``, ``depthwise_conv2d``) is added by torch."""

    def __init__(self, call: Callable, conv: nn.Conv2d, fused: bool):
        super().__init__()
        self.call, self.fused = call, fused
        self.subsample = conv.stride[0] if conv.kernel_size == (1, 1) and conv.padding == (0, 0) else 1
        self.weight = nn.Parameter(conv.weight.detach().contiguous(), requires_grad=False)
        self.bias = None if conv.bias is None else nn.Parameter(conv.bias.detach().contiguous(),
                                                                requires_grad=False)

    def forward(self, x):
        if self.subsample > 1:     # a strided 1x1 convolution: pointwise on every stride-th pixel
            x = x[:, :, ::self.subsample, ::self.subsample]
        y = self.call([x.contiguous(), self.weight, *([self.bias] if self.fused else [])])
        return y.add_(self.bias.view(1, -1, 1, 1)) if self.bias is not None and not self.fused else y  # y is ours


class TunedLinear(nn.Module):
    """A linear layer as a matrix product ``(rows, in) @ (in, out)`` by a tuned kernel."""

    def __init__(self, call: Callable, linear: nn.Linear, fused: bool):
        super().__init__()
        self.call, self.fused = call, fused
        self.weight_t = nn.Parameter(linear.weight.detach().t().contiguous(), requires_grad=False)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().contiguous(),
                                                                  requires_grad=False)

    def forward(self, x):
        lead = x.shape[:-1]
        y = self.call([x.reshape(-1, x.shape[-1]).contiguous(), self.weight_t,
                       *([self.bias] if self.fused else [])])
        if self.bias is not None and not self.fused:
            y = y.add_(self.bias)
        return y.reshape(*lead, y.shape[-1])


class TunedProduct(nn.Module):
    """``a @ b`` (batched over equal leading dimensions) by a tuned kernel."""

    def __init__(self, call: Callable):
        super().__init__()
        self.call = call

    def forward(self, a, b):
        lead = a.shape[:-2]
        if a.dim() == 2:
            return self.call([a.contiguous(), b.contiguous()])
        y = self.call([a.reshape(-1, *a.shape[-2:]).contiguous(), b.reshape(-1, *b.shape[-2:]).contiguous()])
        return y.reshape(*lead, *y.shape[-2:])


def tuned_layer(site: Site, call: Callable, modules: dict) -> nn.Module:
    if site.node.op == "call_module":
        layer = modules[site.node.target]
        fused = site.op.bias is not None
        return TunedConv(call, layer, fused) if isinstance(layer, nn.Conv2d) else TunedLinear(call, layer, fused)
    return TunedProduct(call)


def tuned_module(net: Network, calls: dict[tuple[str, str], Callable]) -> fx.GraphModule:
    """A copy of the traced network whose sites with a kernel in ``calls`` (by task) run it;
    the other sites, and everything else, stay in torch."""
    gm = copy.deepcopy(net.graph)
    nodes = {n.name: n for n in gm.graph.nodes}
    modules = dict(gm.named_modules())
    for i, site in enumerate(net.sites):
        call = calls.get(site.task)
        if call is None:
            continue
        node = nodes[site.node.name]
        name = f"tuned_{i}"
        gm.add_submodule(name, tuned_layer(site, call, modules))
        with gm.graph.inserting_before(node):
            new = gm.graph.call_module(name, (node.args[0],) if node.op == "call_module" else tuple(node.args))
        end = nodes[site.relu.name] if site.relu is not None else node
        end.replace_all_uses_with(new)
        if end is not node:
            gm.graph.erase_node(end)
        gm.graph.erase_node(node)
    gm.graph.lint()
    gm.recompile()
    gm.delete_all_unused_submodules()
    return gm


# ---------------------------------------------------------------- checking and timing

# Largest error allowed, relative to the largest output: kernels sum in another order
# than torch, tensor cores round their inputs, and the difference grows with depth.
MODEL_TOLERANCE = {"fp32": 1e-3, "tf32": 2e-2, "fp16": 2e-2, "bf16": 6e-2}


def check_outputs(tuned: nn.Module, reference: nn.Module, example: tuple[torch.Tensor, ...],
                  draws: int = 2, seed: int = 0, dtype: str = "fp32") -> str | None:
    """Why ``tuned`` disagrees with ``reference`` on random inputs like ``example``, or None
    (outputs compared relative to their largest magnitude, :data:`MODEL_TOLERANCE`)."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    with torch.no_grad():
        for d in range(draws):
            inputs = tuple(torch.randn(t.shape, generator=gen).to(t.device, t.dtype)
                           if t.is_floating_point() else t for t in example)
            want, got = reference(*inputs), tuned(*inputs)
            for w, g in zip(_flat(want), _flat(got)):
                if w.shape != g.shape:
                    return f"output shape {tuple(g.shape)} where torch gives {tuple(w.shape)}"
                if not torch.isfinite(g).all():
                    return "output has NaN or infinity"
                err = (w.float() - g.float()).abs().max().item()
                scale = max(w.float().abs().max().item(), 1e-6)
                if err > MODEL_TOLERANCE[dtype] * scale:
                    return f"output differs from torch by {err:.3g} (largest output {scale:.3g}), draw {d + 1}"
    return None


def _flat(x) -> list[torch.Tensor]:
    return [x] if isinstance(x, torch.Tensor) else [t for y in x for t in _flat(y)]


def _sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize()


def time_alternating(fns: dict[str, Callable[[], object]], device: torch.device, rounds: int = 5,
                     block_s: float = 0.3) -> dict[str, list[float]]:
    """Milliseconds per call of each of ``fns``, one median per round, timed in alternating
    blocks (so a machine whose speed drifts slows all alike); each is warmed up first."""
    def timed(fn):
        def call():
            fn()
            _sync(device)
        return call

    calls = {k: timed(f) for k, f in fns.items()}
    with torch.inference_mode():   # as a model is deployed
        for call in calls.values():
            call()
            call()
        out: dict[str, list[float]] = {k: [] for k in calls}
        for _ in range(rounds):
            for k, call in calls.items():
                time.sleep(0.05)   # lets spinning OpenMP threads of the previous block go idle
                out[k].append(statistics.median(time_calls(call, 3, 1000, block_s)) * 1e3)
    return out
