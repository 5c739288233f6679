"""The fast unmerged forward/backward (custom autograd Linear, per-call conv path) against the oracle."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlite
from peftlite import _linear_autograd
from peftlite import functional as F_
from peftlite.layers import conv_inference_path, conv_training_path


def _linear_case(dtype=torch.float64, shape=(3, 5, 12), out=7, rank=3, bias=True):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()
    return mk(*shape), mk(out, shape[-1]), (mk(out) if bias else None), mk(rank, shape[-1]), mk(out, rank)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_function_gradcheck(bias):
    x, w, b, A, B = _linear_case(bias=bias)
    assert torch.autograd.gradcheck(lambda *t: _linear_autograd.lora_linear(*t, 0.7), (x, w, b, A, B))


def test_linear_function_matches_functional_oracle_fp32():
    case = _linear_case(torch.float32, (64, 48), 40, 8)
    x, w, b, A, B = (t.detach().requires_grad_() for t in case)
    y = _linear_autograd.lora_linear(x, w, b, A, B, 2.0)
    y.square().sum().backward()
    got = [t.grad.clone() for t in (x, w, b, A, B)]
    for t in (x, w, b, A, B):
        t.grad = None
    ref = F_.lora_linear(x, w, b, A, B, 2.0)
    ref.square().sum().backward()
    torch.testing.assert_close(y, ref, rtol=1e-5, atol=1e-5)
    for g_got, t in zip(got, (x, w, b, A, B), strict=True):
        torch.testing.assert_close(g_got, t.grad, rtol=1e-4, atol=1e-4)


def test_linear_function_under_cpu_autocast_bf16():
    x, w, b, A, B = (t.detach().requires_grad_() for t in _linear_case(torch.float32, (32, 64), 48, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        y = _linear_autograd.lora_linear(x, w, b, A, B, 1.0)
        ref = F_.lora_linear(x, w, b, A, B, 1.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


def test_wrapped_linear_uses_it_and_saves_no_output_sized_tensor():
    model = nn.Sequential(nn.Linear(32, 24))
    peftlite.wrap(model, targets="0", rank=4)
    nn.init.normal_(model[0].lora.default.B)
    x = torch.randn(16, 32)
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t.shape) or t, lambda t: t):
        y = model(x)
    p = model[0].lora.default
    ref = F_.lora_linear(x, model[0]._parameters["weight"], model[0].bias, p.A, p.B, p.scale)
    torch.testing.assert_close(y, ref)
    assert torch.Size([16, 24]) not in saved, saved


def test_dropout_zero_skips_dropout_and_dropout_positive_uses_reference():
    model = nn.Sequential(nn.Linear(8, 8))
    peftlite.wrap(model, targets="0", rank=2, dropout=0.5)
    model.train()
    torch.manual_seed(0)
    y1 = model(torch.ones(4, 8))
    torch.manual_seed(1)
    y2 = model(torch.ones(4, 8))
    nn.init.normal_(model[0].lora.default.B)
    torch.manual_seed(0)
    y3 = model(torch.ones(4, 8))
    torch.manual_seed(1)
    y4 = model(torch.ones(4, 8))
    assert torch.equal(y1, y2)  # B = 0: dropout has no effect on the output
    assert not torch.equal(y3, y4)  # dropout active on the adapter path


def test_conv_path_cost_model_per_call():
    from peftlite.functional import ConvGeometry
    dense = ConvGeometry(256, 256, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")
    depthwise = ConvGeometry(256, 256, (3, 3), (1, 1), (1, 1), (1, 1), 256, "zeros")
    assert conv_training_path(dense, 8) == "merged"  # many pixels: two r-wide passes beat three
    assert conv_training_path(depthwise, 8) == "weight"  # fan_in 9: the full weight gradient is cheaper
    assert conv_training_path(dense, 8, pixels=8 * 56 * 56) == "merged"
    assert conv_training_path(dense, 8, pixels=8 * 4 * 4) == "activations"  # ResNet-50 layer4 at 128 px
    assert conv_training_path(dense, 8, pixels=1) == "activations"
    assert conv_training_path(depthwise, 8, pixels=8 * 56 * 56) == "weight"
    grouped = ConvGeometry(64, 64, (1, 1), (1, 1), (0, 0), (1, 1), 16, "zeros")  # fan_in 4
    assert conv_training_path(grouped, 1, pixels=10**6) == "weight"
    assert conv_training_path(grouped, 1, pixels=1) == "activations"  # forming ΔW costs more than 1 pixel


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
            geom = m._lora_state.geometry
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


def test_conv_inference_path_follows_the_feature_map_size():
    late = F_.ConvGeometry(512, 512, (3, 3), (1, 1), (1, 1), (1, 1), 1, "zeros")
    assert conv_inference_path(late, 8, pixels=8 * 5 * 5) == "activations"  # ResNet-50 layer4 at 160 px
    assert conv_inference_path(late, 8, pixels=8 * 56 * 56) == "weight"
    depthwise = F_.ConvGeometry(64, 64, (3, 3), (1, 1), (1, 1), (1, 1), 64, "zeros")
    assert conv_inference_path(depthwise, 8, pixels=64) == "weight"
