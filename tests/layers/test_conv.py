"""LoraConv2d: the cost model that picks its path per call, the paths against the oracle, torch.compile."""

from __future__ import annotations

import torch
from torch import nn

import peftlite
from peftlite import functional as F_
from peftlite.layers.conv import inference_path, training_path


def test_conv_path_cost_model_per_call():
    dense = F_.ConvGeometry(256, 256, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")
    depthwise = F_.ConvGeometry(256, 256, (3, 3), (1, 1), (1, 1), (1, 1), 256, "zeros")
    assert training_path(dense, 8) == "merged"  # many pixels: two r-wide passes beat three
    assert training_path(depthwise, 8) == "dense"  # fan_in 9: the full weight gradient is cheaper
    assert training_path(dense, 8, pixels=8 * 56 * 56) == "merged"
    assert training_path(dense, 8, pixels=8 * 4 * 4) == "activations"  # ResNet-50 layer4 at 128 px
    assert training_path(dense, 8, pixels=1) == "activations"
    assert training_path(depthwise, 8, pixels=8 * 56 * 56) == "dense"
    grouped = F_.ConvGeometry(64, 64, (1, 1), (1, 1), (0, 0), (1, 1), 16, "zeros")  # fan_in 4
    assert training_path(grouped, 1, pixels=10**6) == "dense"
    assert training_path(grouped, 1, pixels=1) == "activations"  # forming ΔW costs more than 1 pixel


def test_conv_paths_agree_with_oracle():
    model = nn.Sequential(nn.Conv2d(4, 16, 3, padding=1), nn.Conv2d(16, 16, 3, groups=4, padding=1))
    peftlite.wrap(model, targets="*", rank=2)
    for m in model:
        nn.init.normal_(m.lora.default.B)
    for n in (1, 64):  # few pixels: weight path; many: activations
        x = torch.randn(n, 4, 6, 6)
        y = model(x)
        ref = x
        for m in model:
            p = m.lora.default
            geom = m.geometry
            ref = F_.lora_conv2d(ref, m._parameters["weight"], m.bias, p.A, p.B, p.scale, geom)
        torch.testing.assert_close(y, ref, rtol=1e-4, atol=1e-4)
        y.sum().backward()
        assert model[0].lora.default.A.grad is not None


def test_torch_compile_fullgraph_on_wrapped_model():
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 8 * 8, 10))
    peftlite.wrap(model, targets=["0", "3"], rank=4)
    for m in (model[0], model[3]):
        nn.init.normal_(m.lora.default.B)
    x = torch.randn(2, 3, 8, 8)
    eager = model(x)
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    out = compiled(x)
    torch.testing.assert_close(out, eager)
    out.sum().backward()
    assert model[3].lora.default.A.grad is not None and model[0].lora.default.B.grad is not None
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), model(x))


def test_inference_path_follows_the_feature_map_size():
    late = F_.ConvGeometry(512, 512, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")
    assert inference_path(late, 8, pixels=8 * 5 * 5) == "activations"  # ResNet-50 layer4 at 160 px
    assert inference_path(late, 8, pixels=8 * 56 * 56) == "merged"
    depthwise = F_.ConvGeometry(64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 64, "zeros")
    assert inference_path(depthwise, 8, pixels=64) == "merged"
