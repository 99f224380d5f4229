"""Tasks extracted from the built-in networks and from user modules, and bad input."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from models.tasks import ExtractError, extract
from models.zoo import MODELS, ModelError, load_model


def _tasks(name: str, batch: int = 1):
    _, module, example = load_model(name, batch)
    net = extract(module, example)
    return net, {(op.kind, op.shape_str): w for op, w in net.tasks()}


@pytest.mark.parametrize("name, sites, tasks, expected", [
    ("resnet18", 21, 16, {("conv2d_bias_relu", "1,3,224,224,64,7,7,2,3"): 1,     # stem, ReLU fused
                          ("conv2d_bias_relu", "1,64,56,56,64,3,3,1,1"): 2,
                          ("conv2d", "1,64,56,56,64,3,3,1,1"): 2,                 # before the residual add
                          ("conv2d", "1,64,28,28,128,1,1,1,0"): 1,                # shortcut, subsampled
                          ("matmul", "1x1000x512"): 1}),
    ("resnet50", 54, 24, {("conv2d", "1,256,14,14,1024,1,1,1,0"): 6,
                          ("conv2d_bias_relu", "1,256,14,14,256,3,3,1,1"): 5,
                          ("matmul", "1x1000x2048"): 1}),
    ("mobilenet_v2", 53, 31, {("depthwise_conv2d", "1,32,112,112,3,3,1,1"): 1,
                              ("depthwise_conv2d", "1,384,14,14,3,3,1,1"): 4,
                              ("conv2d", "1,3,224,224,32,3,3,2,1"): 1}),         # ReLU6 stays in torch
    ("bert_layer", 8, 5, {("matmul", "128x768x768"): 4, ("matmul", "128x3072x768"): 1,
                          ("batch_matmul", "12x128x128x64"): 1, ("batch_matmul", "12x128x64x128"): 1}),
])
def test_builtin_models(name, sites, tasks, expected):
    net, found = _tasks(name)
    assert (len(net.sites), len(found)) == (sites, tasks)
    for task, weight in expected.items():
        assert found.get(task) == weight, task


def test_every_builtin_model_is_covered():
    assert set(MODELS) == {"resnet18", "resnet50", "mobilenet_v2", "bert_layer"}


def test_batch_reaches_every_task():
    _, found = _tasks("bert_layer", batch=2)
    assert ("matmul", "256x768x768") in found and ("batch_matmul", "24x128x128x64") in found


def test_linear_with_relu_is_one_dense_task():
    net = extract(nn.Sequential(nn.Linear(16, 32), nn.ReLU(), nn.Linear(32, 4)).eval(), (torch.randn(3, 16),))
    assert [(op.kind, op.shape_str) for op, _ in net.tasks()] == [("dense_bias_relu", "3x32x16"),
                                                                  ("matmul", "3x4x32")]


def test_grouped_and_dilated_convolutions_stay_in_torch():
    module = nn.Sequential(nn.Conv2d(8, 8, 3, groups=2), nn.Conv2d(8, 8, 3, dilation=2), nn.Conv2d(8, 4, 1)).eval()
    net = extract(module, (torch.randn(1, 8, 12, 12),))
    assert [op.kind for op, _ in net.tasks()] == ["conv2d"]


def test_a_module_without_our_operators_is_refused():
    with pytest.raises(ExtractError, match="none of the operators"):
        extract(nn.Sequential(nn.ReLU(), nn.Softmax(-1)).eval(), (torch.randn(2, 3),))


def test_a_module_fx_cannot_trace_is_one_error():
    class Branchy(nn.Module):
        def forward(self, x):
            return x if x.sum() > 0 else -x
    with pytest.raises(ExtractError, match="cannot be traced"):
        extract(Branchy(), (torch.randn(2),))


@pytest.mark.parametrize("body, why", [
    ("def build():\n    raise RuntimeError('boom')\n", r"build\(\) raised RuntimeError: boom"),
    ("def build():\n    return 3\n", "must return"),
    ("x = 1\n", "has no function 'build'"),
    ("import nonexistent_module_xyz\n", "failed to import"),
])
def test_bad_factories_are_clear_errors(tmp_path, body, why):
    path = tmp_path / "net.py"
    path.write_text(body)
    with pytest.raises(ModelError, match=why):
        load_model(f"{path}:build")


def test_unknown_model_names_the_built_in_ones():
    with pytest.raises(ModelError, match="resnet18, resnet50"):
        load_model("resnet1000")
