"""DoRA and rsLoRA on every layer type: forward and gradients in fp64 against a dense reference
(``m ⊙ (W + sΔW) / ‖W + sΔW‖_row``, the norm detached as in the DoRA paper), the norm without a
W-sized temporary, its reuse in inference, and the named-adapter rules."""

from __future__ import annotations

import math

import pytest
import torch
import torch.nn.functional as F
from test_attention import SameConv
from torch import nn

import peftlite
from _geometries import GEOMETRIES
from _merging import assert_merge_cycles
from peftlite import functional


def dora(layer, rank=3, alpha=5.0, rank_scaling="linear", seed=0):
    model = nn.Sequential(layer)
    peftlite.wrap(model, "0", rank=rank, alpha=alpha, variant="dora", rank_scaling=rank_scaling)
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for pair in layer.pairs("default").values():
            pair.A.copy_(torch.randn(pair.A.shape, generator=g, dtype=torch.float64))
            pair.B.copy_(torch.randn(pair.B.shape, generator=g, dtype=torch.float64))
            pair.magnitude.mul_(torch.rand(pair.magnitude.shape, generator=g, dtype=torch.float64) + 0.5)
    return model


def dense(w, pair):
    """The reference, W-sized: the DoRA weight of one pair, norm detached."""
    return functional.dora_weight(w, pair.A, pair.B, pair.scale, pair.magnitude)


def grads(out, pair):
    return torch.autograd.grad(out.square().sum(), [pair.A, pair.B, pair.magnitude])


def test_a_new_dora_adapter_computes_the_base():
    torch.manual_seed(0)
    lin = nn.Linear(6, 5).double()
    x = torch.randn(3, 6, dtype=torch.float64)
    want = lin(x)
    model = nn.Sequential(lin)
    peftlite.wrap(model, "0", variant="dora")
    torch.testing.assert_close(model(x), want, rtol=1e-12, atol=1e-12)  # B = 0 and m = ‖W‖: exactly W


@pytest.mark.parametrize("rank_scaling", ["linear", "sqrt"])
@pytest.mark.parametrize("grad", [True, False], ids=["train", "infer"])
def test_linear_forward_and_gradients_fp64(rank_scaling, grad):
    torch.manual_seed(0)
    model = dora(nn.Linear(7, 5).double(), rank_scaling=rank_scaling)
    layer, pair = model[0], model[0].lora.default
    assert pair.scale == pytest.approx(5.0 / (math.sqrt(3) if rank_scaling == "sqrt" else 3))
    x = torch.randn(2, 4, 7, dtype=torch.float64)
    with torch.set_grad_enabled(grad):
        y = model(x)
        ref = F.linear(x, dense(layer._parameters["weight"], pair), layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    if grad:
        for got, want in zip(grads(y, pair), grads(ref, pair), strict=True):
            torch.testing.assert_close(got, want, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
def test_conv_every_geometry_fp64(geom):
    cin, cout, k, s, p, d, g, mode, bias = geom
    torch.manual_seed(0)
    model = dora(nn.Conv2d(cin, cout, k, s, p, d, g, bias, mode).double(), rank=2)
    layer, pair = model[0], model[0].lora.default
    x = torch.randn(2, cin, 9, 11, dtype=torch.float64)
    y = model(x)
    ref = nn.Conv2d._conv_forward(layer, x, dense(layer._parameters["weight"], pair), layer.bias)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    for got, want in zip(grads(y, pair), grads(ref, pair), strict=True):
        torch.testing.assert_close(got, want, rtol=1e-9, atol=1e-10)


def test_attention_and_subclasses_through_the_effective_weight():
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, batch_first=True).double()
    model = nn.Sequential(mha)
    peftlite.wrap(model, "0", rank=2, variant="dora")
    pair = mha.lora.default.in_proj_weight
    with torch.no_grad():
        pair.B.normal_()
    x = torch.randn(2, 3, 8, dtype=torch.float64)
    y = mha(x, x, x)[0]
    w = dense(mha._parameters["in_proj_weight"], pair)
    ref = F.multi_head_attention_forward(
        x.transpose(0, 1), x.transpose(0, 1), x.transpose(0, 1), 8, 2, w, mha.in_proj_bias, None, None, False, 0.0,
        mha.out_proj.weight, mha.out_proj.bias, training=False)[0].transpose(0, 1)
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)
    conv = dora(SameConv(3, 4, 3, stride=2).double(), rank=2)  # its own forward reads self.weight
    x = torch.randn(1, 3, 9, 9, dtype=torch.float64)
    plain = SameConv(3, 4, 3, stride=2).double()
    plain.load_state_dict({k: v for k, v in conv[0].state_dict().items() if "lora" not in k and "extra" not in k})
    plain.weight = nn.Parameter(dense(conv[0]._parameters["weight"], conv[0].lora.default).detach())
    torch.testing.assert_close(conv(x), plain(x), rtol=1e-10, atol=1e-10)


def test_norms_without_a_weight_sized_temporary():
    torch.manual_seed(0)
    for dtype in (torch.float32, torch.bfloat16):
        W = torch.randn(600, 1024).to(dtype)
        A, B = torch.randn(8, 1024) / 32, torch.randn(600, 8)
        want = torch.linalg.vector_norm(W.double() + 0.7 * (B.double() @ A.double()), dim=1)
        with torch.profiler.profile(activities=[torch.profiler.ProfilerActivity.CPU], profile_memory=True) as prof:
            got = functional.dora_norms(W, A, B, 0.7)
        torch.testing.assert_close(got.double(), want, rtol=1e-5, atol=1e-4)
        largest = max((e.cpu_memory_usage for e in prof.events() if e.cpu_memory_usage > 0), default=0)
        assert largest < W.numel() * 4 / 2, f"{dtype}: an allocation of {largest} bytes (W: {W.numel()} elements)"


def test_inference_reuses_the_norms_until_something_changes(monkeypatch):
    model = dora(nn.Linear(16, 8).double())
    calls = []
    real = functional.dora_norms
    monkeypatch.setattr(functional, "dora_norms", lambda *a: calls.append(1) or real(*a))
    x = torch.randn(2, 16, dtype=torch.float64)
    with torch.no_grad():
        first = model(x)
        for _ in range(5):
            torch.testing.assert_close(model(x), first, rtol=0, atol=0)
        assert len(calls) == 1
        model[0].lora.default.B.add_(0.1)  # an in-place change (an optimizer step) is seen
        changed = model(x)
    assert len(calls) == 2 and not torch.allclose(changed, first)


def test_named_dora_adapters_switch_route_and_refuse_sums():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(6, 6), nn.Tanh(), nn.Linear(6, 3)).double()
    peftlite.wrap(model, nn.Linear, rank=2, name="d", variant="dora")
    peftlite.wrap(model, nn.Linear, rank=2, name="l")
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.normal_()
            if n.endswith(".magnitude"):
                p.mul_(1.3)
    with pytest.raises(ValueError, match="'d' is a DoRA adapter, whose magnitudes do not add: use it alone"):
        peftlite.use(model, ["d", "l"])
    with pytest.raises(ValueError, match="use it alone, at weight 1"):
        peftlite.use(model, {"d": 0.5})
    with pytest.raises(ValueError, match="combine: 'd' is a DoRA adapter"):
        peftlite.combine(model, {"d": 1.0, "l": 1.0}, name="x", how="cat")
    route = ["d", "l", None, "d"]
    x = torch.randn(4, 6, dtype=torch.float64)
    rows = []
    for i, name in enumerate(route):
        peftlite.use(model, name)
        rows.append(model(x[i:i + 1]))
    peftlite.use(model, ["l"])
    with torch.no_grad(), peftlite.per_sample(model, route):
        torch.testing.assert_close(model(x), torch.cat(rows).detach(), rtol=1e-12, atol=1e-12)
    with pytest.raises(ValueError, match="prepare_hotswap: 'd' is a DoRA adapter"):
        peftlite.prepare_hotswap(model)


def test_bad_variant_arguments():
    with pytest.raises(ValueError, match=r"variant must be one of 'lora', 'dora', got 'vera'"):
        peftlite.wrap(nn.Sequential(nn.Linear(2, 2)), "0", variant="vera")
    with pytest.raises(ValueError, match=r"rank_scaling must be 'linear' .* or 'sqrt' .*got 'log'"):
        peftlite.wrap(nn.Sequential(nn.Linear(2, 2)), "0", rank_scaling="log")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16], ids=str)
def test_merge_folds_the_gain_and_unmerge_is_bit_exact(dtype):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Conv2d(3, 8, 3, padding=1), nn.ReLU(), nn.Flatten(), nn.Linear(8 * 5 * 5, 6)).to(dtype)
    peftlite.wrap(model, (nn.Conv2d, nn.Linear), rank=3, variant="dora")
    g = torch.Generator().manual_seed(1)
    with torch.no_grad():
        for n, p in model.named_parameters():
            if n.endswith(".B"):
                p.copy_(torch.randn(p.shape, generator=g) * 0.05)
            if n.endswith(".magnitude"):
                p.mul_(0.5 + 1.5 * torch.rand(p.shape, generator=g))
                p[0] = -p[0]  # nothing keeps a magnitude positive
                p[1] = 0.0
    assert_merge_cycles(model, torch.randn(2, 3, 5, 5).to(dtype))
