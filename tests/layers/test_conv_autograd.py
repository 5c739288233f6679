"""The conv autograd functions (activations, merged and dense paths) against the functional oracle, every geometry."""

from __future__ import annotations

import pytest
import torch
from torch import nn

from _geometries import GEOMETRIES
from peftlite import functional as F_
from peftlite.kernels import depthwise
from peftlite.layers import conv_autograd as _conv_autograd

PATHS = ["activations", "merged", "dense"]
ids = lambda g: "-".join(map(str, g))


def _case(geom, dtype=torch.float64, rank=3, n=2, size=(11, 13), train_base=False, seed=0):
    cin, cout, k, s, p, d, g, mode, bias = geom
    torch.manual_seed(seed)
    conv = nn.Conv2d(cin, cout, k, s, p, d, g, bias, mode).to(dtype)
    gm = F_.ConvGeometry.of(conv)
    gen = torch.Generator().manual_seed(seed + 1)
    mk = lambda *shape: torch.randn(*shape, generator=gen, dtype=dtype).requires_grad_()
    x, A, B = mk(n, cin, *size), mk(rank, gm.fan_in), mk(cout, rank)
    w, b = conv.weight.detach().requires_grad_(train_base), None
    if bias:
        b = conv.bias.detach().requires_grad_(train_base)
    return gm, x, w, b, A, B


def _outputs_and_grads(fn, gm, x, w, b, A, B, scale=0.7):
    y = fn(x, w, b, A, B, scale, gm)
    gy = torch.randn(y.shape, generator=torch.Generator().manual_seed(7), dtype=y.dtype)
    leaves = [t for t in (x, w, b, A, B) if t is not None and t.requires_grad]
    return [y, *torch.autograd.grad(y, leaves, gy)]


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trained-base"])
@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geom", GEOMETRIES, ids=ids)
def test_function_matches_oracle_fp64(geom, path, train_base):
    case = _case(geom, train_base=train_base)
    got = _outputs_and_grads(lambda *a: _conv_autograd.adapted_conv2d(*a, path=path), *case)
    ref = _outputs_and_grads(F_.lora_conv2d, *case)
    assert len(got) == len(ref) == (4 + (1 + (geom[-1])) * train_base)
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


STRIDED_POINTWISE = [(4, 6, 1, 2, 0, 1, 1, "zeros", True), (5, 3, 1, (2, 3), 0, 1, 1, "zeros", False),
                     (4, 6, 1, 3, 0, 1, 2, "zeros", True)]  # the last grouped: torch's kernel


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trained-base"])
@pytest.mark.parametrize("geom", STRIDED_POINTWISE, ids=ids)
def test_strided_pointwise_input_grad_matches_oracle_fp64(geom, train_base):
    """A's share of ∂x of a strided 1x1 conv, written out as a matrix product (``_strided_pointwise_input_grad``)."""
    for size in ((11, 13), (8, 9)):
        case = _case(geom, train_base=train_base, size=size)
        got = _outputs_and_grads(lambda *a: _conv_autograd.adapted_conv2d(*a, path="activations"), *case)
        ref = _outputs_and_grads(F_.lora_conv2d, *case)
        for u, v in zip(got, ref, strict=True):
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geom", [GEOMETRIES[0], GEOMETRIES[4], GEOMETRIES[9], GEOMETRIES[11], GEOMETRIES[12]],
                         ids=ids)
def test_function_gradcheck(geom, path):
    gm, x, w, b, A, B = _case(geom, n=1, size=(6, 7), train_base=True)
    args = (x, w, b, A, B) if b is not None else (x, w, A, B)

    def fn(*t):
        x, w, *rest = t
        b, A, B = rest if len(rest) == 3 else (None, *rest)
        return _conv_autograd.adapted_conv2d(x, w, b, A, B, 0.7, gm, path=path)

    assert torch.autograd.gradcheck(fn, args)


# ResNet-like layers: pointwise (the in-place ∂x fold), strided pointwise, 3x3, in fp32 at ResNet scales.
RESNET = [(64, 256, 1, 1, 0, 1, 1, "zeros", False), (256, 128, 1, 2, 0, 1, 1, "zeros", False),
          (64, 64, 3, 1, 1, 1, 1, "zeros", False), (32, 32, 3, 2, 1, 1, 1, "zeros", True),
          (48, 48, 7, 1, 3, 1, 48, "zeros", True)]  # ConvNeXt's depthwise 7x7: the dense path's own kernel


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geom", RESNET, ids=ids)
@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
def test_function_matches_oracle_fp32(geom, path, layout):
    gm, x, w, b, A, B = _case(geom, torch.float32, rank=8, n=4, size=(16, 16))
    fmt = torch.channels_last if layout == "channels_last" else torch.contiguous_format
    x = x.detach().contiguous(memory_format=fmt).requires_grad_()
    got = _outputs_and_grads(lambda *a: _conv_autograd.adapted_conv2d(*a, path=path), gm, x, w, b, A, B)
    ref = _outputs_and_grads(F_.lora_conv2d, gm, x, w, b, A, B)
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-4, atol=1e-3)


@pytest.mark.parametrize("path", PATHS)
@pytest.mark.parametrize("geom", RESNET[:2], ids=ids)
def test_function_with_an_expanded_output_gradient(geom, path):
    """``y.sum()`` hands backward a stride-0 gradient: the NCHW fast branches must not assume a layout."""
    gm, x, w, b, A, B = _case(geom, rank=4, n=2, size=(6, 6))
    got = torch.autograd.grad(_conv_autograd.adapted_conv2d(x, w, b, A, B, 0.7, gm, path=path).sum(), (x, A, B))
    ref = torch.autograd.grad(F_.lora_conv2d(x, w, b, A, B, 0.7, gm).sum(), (x, A, B))
    for u, v in zip(got, ref, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("path", PATHS)
def test_function_under_cpu_autocast_matches_autocast_oracle(path):
    gm, x, w, b, A, B = _case(RESNET[0], torch.float32, rank=8, n=2, size=(8, 8))
    with torch.autocast("cpu", dtype=torch.bfloat16):
        got = _outputs_and_grads(lambda *a: _conv_autograd.adapted_conv2d(*a, path=path), gm, x, w, b, A, B)
        ref = _outputs_and_grads(F_.lora_conv2d, gm, x, w, b, A, B)
    assert got[0].dtype == ref[0].dtype == torch.bfloat16
    for u, v, t in zip(got[1:], ref[1:], (x, A, B), strict=True):
        assert u.dtype == t.dtype  # gradients in the leaves' dtypes
        torch.testing.assert_close(u, v, rtol=0.05, atol=0.05 * float(v.abs().max()))


@pytest.mark.parametrize("shape", [(7, 7, 3, 3), (3, 5, 1, 2), (5, 1, 0, 0)], ids=["7x7", "3x5", "5x1-valid"])
def test_depthwise_weight_gradient_matches_torch_fp64(shape):
    """The dense path's depthwise kernel (``kernels.depthwise``) against torch's convolution_backward."""
    kh, kw, ph, pw = shape
    gen = torch.Generator().manual_seed(0)
    x = torch.randn(3, 5, 9, 11, generator=gen, dtype=torch.float64)
    gm = F_.ConvGeometry(5, 5, (kh, kw), (1, 1), (ph, pw), (1, 1), 5, "zeros")
    w = torch.randn(5, 1, kh, kw, generator=gen, dtype=torch.float64)
    g = torch.randn(torch.nn.functional.conv2d(x, w, None, 1, (ph, pw), 1, 5).shape, generator=gen,
                    dtype=torch.float64)
    assert _conv_autograd._is_depthwise(gm)
    want = torch.ops.aten.convolution_backward(g, x, w, None, [1, 1], [ph, pw], [1, 1], False, [0, 0], 5,
                                               [False, True, False])[1]
    assert depthwise.library() is not None  # a C compiler is part of the test machine
    torch.testing.assert_close(depthwise.weight_grad(g, x, (kh, kw), (ph, pw)), want, rtol=1e-12, atol=1e-12)
    got32 = depthwise.weight_grad(g.float(), x.float(), (kh, kw), (ph, pw))
    assert got32.dtype == torch.float32
    torch.testing.assert_close(got32.double(), want, rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("path", PATHS)
def test_function_compiles_fullgraph(path):
    gm, x, w, b, A, B = _case(GEOMETRIES[0], torch.float32, rank=4, n=2, size=(8, 8))
    fn = lambda x, A, B: _conv_autograd.adapted_conv2d(x, w, b, A, B, 0.5, gm, path=path)
    compiled = torch.compile(fn, fullgraph=True, backend="aot_eager")
    y, ref = compiled(x, A, B), fn(x, A, B)
    torch.testing.assert_close(y, ref)
    got = torch.autograd.grad(y.square().sum(), (x, A, B))
    want = torch.autograd.grad(ref.square().sum(), (x, A, B))
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v)
