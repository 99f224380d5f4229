"""Built-in networks with random weights (nothing is downloaded), and user modules.

The layer shapes are those of the published networks at 224x224 (ResNet-18, ResNet-50,
MobileNetV2) and of one BERT-base encoder layer (hidden 768, 12 heads, feed-forward
3072, 128 tokens), so their tasks are the shapes users tune. A user module comes from
``FILE.py:FACTORY``: a function of no arguments returning ``(module, example_input)``,
the input a tensor or a tuple of tensors.
"""

from __future__ import annotations

import math
from pathlib import Path
from typing import Callable

import torch
from torch import nn

from kernels.ir.ops import run_user_file


class ModelError(ValueError):
    """An unknown model name or a user module that cannot be loaded."""


# ---------------------------------------------------------------- ResNet

def _conv_bn(c_in: int, c_out: int, k: int, stride: int = 1) -> list[nn.Module]:
    return [nn.Conv2d(c_in, c_out, k, stride, k // 2, bias=False), nn.BatchNorm2d(c_out)]


class Residual(nn.Module):
    """``relu(body(x) + shortcut(x))``; the shortcut is a strided 1x1 convolution where the
    body changes the size or the channels."""

    expansion = 1

    def __init__(self, body: list[nn.Module], c_in: int, c_out: int, stride: int):
        super().__init__()
        self.body = nn.Sequential(*body)
        self.shortcut = (nn.Sequential(*_conv_bn(c_in, c_out, 1, stride))
                         if stride != 1 or c_in != c_out else nn.Identity())
        self.relu = nn.ReLU()

    def forward(self, x):
        return self.relu(self.body(x) + self.shortcut(x))


class BasicBlock(Residual):
    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__([*_conv_bn(c_in, width, 3, stride), nn.ReLU(), *_conv_bn(width, width, 3)],
                         c_in, width, stride)


class Bottleneck(Residual):
    expansion = 4

    def __init__(self, c_in: int, width: int, stride: int):
        super().__init__([*_conv_bn(c_in, width, 1), nn.ReLU(), *_conv_bn(width, width, 3, stride), nn.ReLU(),
                          *_conv_bn(width, width * 4, 1)], c_in, width * 4, stride)


class ResNet(nn.Module):
    def __init__(self, block: type, layers: tuple[int, ...], classes: int = 1000):
        super().__init__()
        stages, c = [], 64
        for i, n in enumerate(layers):
            width = 64 << i
            for j in range(n):
                stages.append(block(c, width, 2 if i > 0 and j == 0 else 1))
                c = width * block.expansion
        self.stem = nn.Sequential(*_conv_bn(3, 64, 7, 2), nn.ReLU(), nn.MaxPool2d(3, 2, 1))
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.fc = nn.Linear(c, classes)

    def forward(self, x):
        return self.fc(torch.flatten(self.pool(self.stages(self.stem(x))), 1))


# ---------------------------------------------------------------- MobileNetV2

def _conv_bn_relu6(c_in: int, c_out: int, k: int, stride: int = 1, groups: int = 1) -> nn.Sequential:
    return nn.Sequential(nn.Conv2d(c_in, c_out, k, stride, k // 2, groups=groups, bias=False),
                         nn.BatchNorm2d(c_out), nn.ReLU6())


class InvertedResidual(nn.Module):
    def __init__(self, c_in: int, c_out: int, stride: int, expand: int):
        super().__init__()
        hidden = c_in * expand
        layers = [_conv_bn_relu6(c_in, hidden, 1)] if expand != 1 else []
        layers += [_conv_bn_relu6(hidden, hidden, 3, stride, groups=hidden),
                   nn.Conv2d(hidden, c_out, 1, bias=False), nn.BatchNorm2d(c_out)]
        self.body = nn.Sequential(*layers)
        self.residual = stride == 1 and c_in == c_out

    def forward(self, x):
        return x + self.body(x) if self.residual else self.body(x)


class MobileNetV2(nn.Module):
    # (expansion, channels, repeats, first stride), as published
    SETTINGS = ((1, 16, 1, 1), (6, 24, 2, 2), (6, 32, 3, 2), (6, 64, 4, 2),
                (6, 96, 3, 1), (6, 160, 3, 2), (6, 320, 1, 1))

    def __init__(self, classes: int = 1000):
        super().__init__()
        layers, c = [_conv_bn_relu6(3, 32, 3, 2)], 32
        for t, ch, n, s in self.SETTINGS:
            for i in range(n):
                layers.append(InvertedResidual(c, ch, s if i == 0 else 1, t))
                c = ch
        layers.append(_conv_bn_relu6(c, 1280, 1))
        self.features = nn.Sequential(*layers)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.classifier = nn.Linear(1280, classes)

    def forward(self, x):
        return self.classifier(torch.flatten(self.pool(self.features(x)), 1))


# ---------------------------------------------------------------- transformer

class EncoderLayer(nn.Module):
    """A BERT encoder layer written out (attention by batched matmuls, not a fused
    kernel), so its products are visible to tracing."""

    def __init__(self, hidden: int = 768, heads: int = 12, ffn: int = 3072):
        super().__init__()
        self.heads, self.head_dim = heads, hidden // heads
        self.q, self.k, self.v = (nn.Linear(hidden, hidden) for _ in range(3))
        self.proj = nn.Linear(hidden, hidden)
        self.norm1, self.norm2 = nn.LayerNorm(hidden), nn.LayerNorm(hidden)
        self.up, self.down = nn.Linear(hidden, ffn), nn.Linear(ffn, hidden)
        self.act = nn.GELU()

    def forward(self, x):
        b, t, h = x.shape[0], x.shape[1], x.shape[2]   # indexed, not unpacked: tracing sees them

        def split(y):
            return y.reshape(b, t, self.heads, self.head_dim).transpose(1, 2)

        q, k, v = split(self.q(x)), split(self.k(x)), split(self.v(x))
        scores = torch.matmul(q, k.transpose(-2, -1)) / math.sqrt(self.head_dim)
        ctx = torch.matmul(torch.softmax(scores, dim=-1), v)
        x = self.norm1(x + self.proj(ctx.transpose(1, 2).reshape(b, t, h)))
        return self.norm2(x + self.down(self.act(self.up(x))))


# ---------------------------------------------------------------- registry

def _image(model: Callable[[], nn.Module]) -> Callable[[int], tuple[nn.Module, torch.Tensor]]:
    return lambda batch: (model(), torch.randn(batch, 3, 224, 224))


MODELS: dict[str, Callable[[int], tuple[nn.Module, torch.Tensor]]] = {
    "resnet18": _image(lambda: ResNet(BasicBlock, (2, 2, 2, 2))),
    "resnet50": _image(lambda: ResNet(Bottleneck, (3, 4, 6, 3))),
    "mobilenet_v2": _image(MobileNetV2),
    "bert_layer": lambda batch: (EncoderLayer(), torch.randn(batch, 128, 768)),
}


def load_model(spec: str, batch: int = 1, seed: int = 0) -> tuple[str, nn.Module, tuple[torch.Tensor, ...]]:
    """``(name, module in eval mode, example inputs)`` for a built-in name or ``FILE.py:FACTORY``."""
    if batch < 1:
        raise ModelError(f"--batch must be at least 1, got {batch}")
    torch.manual_seed(seed)   # random weights, the same every run
    if spec in MODELS:
        module, example = MODELS[spec](batch)
        name = spec
    elif ":" in spec and spec.rsplit(":", 1)[0].endswith(".py"):
        module, example = _from_file(*spec.rsplit(":", 1))
        name = f"{Path(spec.rsplit(':', 1)[0]).stem}.{spec.rsplit(':', 1)[1]}"
    else:
        raise ModelError(f"unknown model {spec!r}; built in: {', '.join(MODELS)}; or FILE.py:FACTORY")
    example = example if isinstance(example, tuple) else (example,)
    if not isinstance(module, nn.Module) or not all(isinstance(t, torch.Tensor) for t in example):
        raise ModelError(f"{spec} must give (torch.nn.Module, tensor or tuple of tensors), "
                         f"got ({type(module).__name__}, {type(example).__name__})")
    return name, module.eval(), tuple(t.float() if t.is_floating_point() else t for t in example)


def _from_file(path: str, factory: str) -> tuple:
    """Runs the user's own module file (code the user chose to run, unlike data files)."""
    mod = run_user_file(path, "user_model_", ModelError)
    fn = getattr(mod, factory, None)
    if not callable(fn):
        raise ModelError(f"{path} has no function {factory!r}")
    try:
        out = fn()
    except Exception as e:
        raise ModelError(f"{path}:{factory}() raised {type(e).__name__}: {e}") from None
    if not (isinstance(out, tuple) and len(out) == 2):
        raise ModelError(f"{path}:{factory}() must return (module, example_input), got {type(out).__name__}")
    return out
