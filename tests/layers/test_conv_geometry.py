"""Every Conv2d geometry: the adapted layer equals F.conv2d with W + scale·ΔW, computed independently."""

import itertools

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given
from hypothesis import strategies as st
from torch import nn

import peftlite
from _geometries import GEOMETRIES
from peftlite import functional
from peftlite.kernels.dropout import keep_mask, new_seed


def reference(conv, A, B, scale, x):
    """F.conv2d on the merged weight, with nn.Conv2d's own padding logic (independent of peftlite)."""
    base = conv._parameters["weight"]  # the raw base weight (conv.weight would include the adapter)
    out, cin_g, kh, kw = base.shape
    delta = torch.einsum("or,rk->ok", B, A).reshape(out, cin_g, kh, kw)
    return nn.Conv2d._conv_forward(conv, x, base + scale * delta, conv.bias)


def adapted(conv, rank, alpha, seed=0):
    model = nn.Sequential(conv)
    peftlite.wrap(model, "0", rank=rank, alpha=alpha)
    g = torch.Generator().manual_seed(seed)
    pair = conv.lora.default
    with torch.no_grad():
        pair.A.copy_(torch.randn(pair.A.shape, generator=g, dtype=pair.A.dtype))
        pair.B.copy_(torch.randn(pair.B.shape, generator=g, dtype=pair.B.dtype))
    return model, pair




@pytest.mark.parametrize("geom", GEOMETRIES, ids=lambda g: "-".join(map(str, g)))
@pytest.mark.parametrize("path", ["activations", "merged", "module-train", "module-eval"])
def test_conv_geometry_matches_reference(geom, path):
    cin, cout, k, s, p, d, g, mode, bias = geom
    torch.manual_seed(0)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias, mode).double()
    x = torch.randn(2, cin, 11, 13, dtype=torch.float64)
    model, pair = adapted(conv, rank=3, alpha=5.0)
    pair.double()
    ref = reference(conv, pair.A.detach(), pair.B.detach(), 5.0 / 3, x)
    geom_ = functional.ConvGeometry.of(conv)
    w = conv._parameters["weight"]
    if path == "activations":
        y = functional.lora_conv2d(x, w, conv.bias, pair.A, pair.B, pair.scale, geom_)
    elif path == "merged":
        y = functional.lora_conv2d_merged(x, w, conv.bias, pair.A, pair.B, pair.scale, geom_)
    elif path == "module-train":
        model.train()
        y = model(x)  # grad enabled: the cost model picks the path
    else:
        model.eval()
        with torch.no_grad():
            y = model(x)
    assert y.shape == ref.shape
    torch.testing.assert_close(y, ref, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("geom", GEOMETRIES[:4] + GEOMETRIES[9:12], ids=lambda g: "-".join(map(str, g)))
def test_conv_merge_equals_reference(geom):
    cin, cout, k, s, p, d, g, mode, bias = geom
    torch.manual_seed(1)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias, mode).double()
    x = torch.randn(2, cin, 9, 10, dtype=torch.float64)
    model, pair = adapted(conv, rank=2, alpha=2.0)
    pair.double()
    ref = reference(conv, pair.A.detach(), pair.B.detach(), 1.0, x)
    peftlite.merge(model)
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)
    peftlite.unmerge(model)


@given(
    cin_g=st.integers(1, 3), cout_g=st.integers(1, 3), groups=st.integers(1, 3),
    kh=st.integers(1, 4), kw=st.integers(1, 4), stride=st.integers(1, 3), dil=st.integers(1, 2),
    pad=st.sampled_from(["int", "same", "valid", "tuple"]),
    mode=st.sampled_from(["zeros", "reflect", "replicate", "circular"]),
    rank=st.integers(1, 4), bias=st.booleans(),
)
def test_conv_property_random_geometry(cin_g, cout_g, groups, kh, kw, stride, dil, pad, mode, rank, bias):
    if pad == "same":
        stride = 1  # PyTorch only allows 'same' with stride 1
    padding = {"int": min(kh, kw) // 2, "same": "same", "valid": "valid", "tuple": (kh // 2, kw // 2)}[pad]
    torch.manual_seed(cin_g * 100 + kh * 10 + kw)
    conv = nn.Conv2d(cin_g * groups, cout_g * groups, (kh, kw), stride, padding, dil, groups, bias, mode).double()
    x = torch.randn(1, cin_g * groups, 9, 9, dtype=torch.float64)
    model, pair = adapted(conv, rank=rank, alpha=float(rank) * 0.5)
    pair.double()
    ref = reference(conv, pair.A.detach(), pair.B.detach(), 0.5, x)
    torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)
    with torch.no_grad():
        torch.testing.assert_close(model(x), ref, rtol=1e-10, atol=1e-10)


def test_delta_weight_shape_and_grouping():
    A = torch.randn(3, 2 * 3 * 3)
    B = torch.randn(8, 3)
    d = functional.delta_weight(A, B, (8, 2, 3, 3))
    for o, c, i, j in itertools.product(range(8), range(2), range(3), range(3)):
        assert torch.isclose(d[o, c, i, j], (B[o] * A[:, c * 9 + i * 3 + j]).sum(), atol=1e-6)


def test_linear_matches_reference():
    torch.manual_seed(0)
    lin = nn.Linear(7, 5).double()
    model = nn.Sequential(lin)
    peftlite.wrap(model, nn.Linear, rank=2, alpha=4)
    pair = lin.lora.default
    pair.double()
    with torch.no_grad():
        pair.B.normal_()
    x = torch.randn(3, 4, 7, dtype=torch.float64)
    ref = F.linear(x, lin._parameters["weight"] + 2.0 * pair.B @ pair.A, lin.bias)
    torch.testing.assert_close(model(x), ref, rtol=1e-12, atol=1e-12)


@pytest.mark.parametrize("layer", [nn.Linear(6, 4), nn.Conv2d(6, 4, 3, padding=1, padding_mode="reflect")],
                         ids=["linear", "conv-reflect"])
def test_dropout_acts_on_the_adapter_input_in_training_only(layer):
    torch.manual_seed(0)
    model = nn.Sequential(layer)
    peftlite.wrap(model, "0", rank=2, dropout=0.5)
    with torch.no_grad():
        layer.lora.default.B.normal_()
    x = torch.randn(3, 6) if isinstance(layer, nn.Linear) else torch.randn(2, 6, 5, 5)
    pair = layer.lora.default

    def reference(mask):
        with peftlite.disabled(model):
            base = model(x)
        if isinstance(layer, nn.Linear):
            return base + pair.scale * (x * mask) @ pair.A.t() @ pair.B.t()
        geom = functional.ConvGeometry.of(layer)
        xp, padded = functional.pad_input(x * mask, geom)  # dropout first, then the reflect padding
        return base + pair.scale * functional.conv2d_delta(xp, pair.A, pair.B, padded)

    model.train()
    torch.manual_seed(1)
    y_train = model(x)
    torch.manual_seed(1)
    if isinstance(layer, nn.Linear):  # the seeded mask the layer draws (kernels.dropout)
        mask = keep_mask(x.shape, new_seed(), 0.5, "cpu") / 0.5
    else:  # a conv that pads its input itself takes torch's dropout: the same draw the layer makes
        mask = torch.nn.functional.dropout(torch.ones_like(x), 0.5, True)
    torch.testing.assert_close(y_train, reference(mask), rtol=1e-5, atol=1e-5)
    model.eval()
    with torch.no_grad():
        torch.testing.assert_close(model(x), reference(torch.ones_like(x)), rtol=1e-5, atol=1e-5)
        assert not torch.allclose(model(x), y_train)
