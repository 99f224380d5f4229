"""A network's tunable layers as (operator, shape) tasks, found by tracing it with torch.fx.

Batch norms are folded into the convolutions before them (inference), so a ResNet
convolution becomes a convolution with a bias; one followed by a ReLU is one
``conv2d_bias_relu`` task, a linear layer followed by a ReLU one ``dense_bias_relu``.
A strided 1x1 convolution is a pointwise one on the subsampled image (the layer
subsamples before the kernel), which vectorises where the strided reads do not.
Every other convolution (``groups == 1``, or depthwise), linear layer (``matmul``, its
bias added by torch) and batched product of two tensors becomes a task too; what is
none of these (pooling, normalisation, softmax, grouped or dilated convolutions) stays
in torch. Identical tasks are tuned once and weighted by how often the network runs them.
"""

from __future__ import annotations

import math
import operator
from collections import Counter
from dataclasses import dataclass, field

import torch
from torch import fx, nn
from torch.fx.experimental.optimization import fuse
from torch.fx.passes.shape_prop import ShapeProp

from kernels.ir.ops import Operator, OperatorError, make_op

RELUS = (torch.relu, torch.nn.functional.relu, torch.relu_)
MATMULS = (torch.matmul, operator.matmul, torch.bmm)


class ExtractError(ValueError):
    """A network that cannot be traced, or has nothing to tune."""


@dataclass
class Site:
    """One place in the traced graph that a tuned kernel can take over."""

    op: Operator
    node: fx.Node              # the layer's node (a module call or a product)
    relu: fx.Node | None = None  # a ReLU folded into the kernel (conv2d_bias_relu, dense_bias_relu)

    @property
    def task(self) -> tuple[str, str]:
        return self.op.kind, self.op.shape_str


@dataclass
class Network:
    """A traced network (batch norms folded) and the sites of its tasks."""

    graph: fx.GraphModule
    sites: list[Site] = field(default_factory=list)

    def tasks(self) -> list[tuple[Operator, int]]:
        """Distinct tasks with their weights (how many sites run each), heaviest FLOPs first."""
        counts = Counter(s.task for s in self.sites)
        ops = {s.task: s.op for s in self.sites}
        return sorted(((ops[t], n) for t, n in counts.items()), key=lambda x: -x[0].flops * x[1])


def _shape(node) -> tuple[int, ...] | None:
    meta = getattr(node, "meta", {}).get("tensor_meta") if isinstance(node, fx.Node) else None
    return tuple(meta.shape) if meta is not None and hasattr(meta, "shape") else None


def _is_relu(node: fx.Node, modules: dict) -> bool:
    if node.op == "call_module":
        return type(modules[node.target]) is nn.ReLU
    if node.op == "call_function":
        return node.target in RELUS
    return node.op == "call_method" and node.target in ("relu", "relu_")


def _only_relu_user(node: fx.Node, modules: dict) -> fx.Node | None:
    users = list(node.users)
    return users[0] if len(users) == 1 and _is_relu(users[0], modules) else None


def _conv_site(node: fx.Node, conv: nn.Conv2d, modules: dict, dtype: str) -> Site | None:
    x = _shape(node.args[0]) if node.args else None
    if x is None or len(x) != 4 or conv.padding_mode != "zeros" or conv.dilation != (1, 1):
        return None
    if isinstance(conv.padding, str) or conv.padding[0] != conv.padding[1] or conv.stride[0] != conv.stride[1]:
        return None
    n, c, h, w = x
    r, s = conv.kernel_size
    stride, pad = conv.stride[0], conv.padding[0]
    if (r, s, pad) == (1, 1, 0) and stride > 1:     # reads every stride-th pixel: subsampled first
        h, w, stride = -(-h // stride), -(-w // stride), 1
    if conv.groups == 1:
        relu = _only_relu_user(node, modules) if conv.bias is not None else None
        kind = "conv2d_bias_relu" if relu is not None else "conv2d"
        return Site(make_op(kind, (n, c, h, w, conv.out_channels, r, s, stride, pad), dtype), node, relu)
    if conv.groups == c == conv.out_channels:
        return Site(make_op("depthwise_conv2d", (n, c, h, w, r, s, stride, pad), dtype), node)
    return None


def _linear_site(node: fx.Node, linear: nn.Linear, modules: dict, dtype: str) -> Site | None:
    x = _shape(node.args[0]) if node.args else None
    if x is None or len(x) < 1:
        return None
    m = math.prod(x[:-1])
    relu = _only_relu_user(node, modules) if linear.bias is not None else None
    kind = "dense_bias_relu" if relu is not None else "matmul"
    return Site(make_op(kind, (m, linear.out_features, linear.in_features), dtype), node, relu)


def _product_site(node: fx.Node, dtype: str) -> Site | None:
    if len(node.args) != 2 or node.kwargs:
        return None
    a, b = (_shape(x) for x in node.args)
    if a is None or b is None or len(a) != len(b) or len(a) < 2 or a[:-2] != b[:-2] or a[-1] != b[-2]:
        return None   # broadcasting and matrix-vector products stay in torch
    m, k, n = a[-2], a[-1], b[-1]
    if len(a) == 2:
        return Site(make_op("matmul", (m, n, k), dtype), node)
    return Site(make_op("batch_matmul", (math.prod(a[:-2]), m, n, k), dtype), node)


def _site(node: fx.Node, modules: dict, dtype: str) -> Site | None:
    if node.op == "call_module":
        mod = modules[node.target]
        if type(mod) is nn.Conv2d:
            return _conv_site(node, mod, modules, dtype)
        if type(mod) is nn.Linear:
            return _linear_site(node, mod, modules, dtype)
    elif (node.op == "call_function" and node.target in MATMULS) or \
            (node.op == "call_method" and node.target in ("matmul", "bmm")):
        return _product_site(node, dtype)
    return None


def extract(module: nn.Module, example: tuple[torch.Tensor, ...], dtype: str = "fp32") -> Network:
    """Trace ``module`` (in eval mode), fold its batch norms, and find its tasks in ``dtype``."""
    module = module.eval()
    try:
        graph = fuse(module) if any(isinstance(m, nn.BatchNorm2d) for m in module.modules()) \
            else fx.symbolic_trace(module)
        with torch.no_grad():
            ShapeProp(graph).propagate(*example)
    except Exception as e:
        raise ExtractError(f"the model cannot be traced by torch.fx ({type(e).__name__}: "
                           f"{str(e).splitlines()[0] if str(e) else ''})") from None
    modules = dict(graph.named_modules())
    net = Network(graph)
    for node in graph.graph.nodes:
        try:
            site = _site(node, modules, dtype)
        except OperatorError:   # a shape our operators cannot take (too large): torch keeps it
            site = None
        if site is not None:
            net.sites.append(site)
    if not net.sites:
        raise ExtractError("the model has none of the operators schedgym tunes (conv2d, depthwise conv2d, "
                           "linear, batched matmul)")
    return net
