"""LoraLinear: its autograd function against the functional oracle, dropout, in-place use of its output."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import peftlite
from peftlite import functional as F_
from peftlite.layers import linear as _linear_autograd


def _linear_case(dtype=torch.float64, shape=(3, 5, 12), out=7, rank=3, bias=True):
    g = torch.Generator().manual_seed(0)
    mk = lambda *s: torch.randn(*s, generator=g, dtype=dtype).requires_grad_()
    return mk(*shape), mk(out, shape[-1]), (mk(out) if bias else None), mk(rank, shape[-1]), mk(out, rank)


@pytest.mark.parametrize("bias", [True, False])
def test_linear_function_gradcheck(bias):
    x, w, b, A, B = _linear_case(bias=bias)
    assert torch.autograd.gradcheck(lambda *t: _linear_autograd.adapted_linear(*t, 0.7), (x, w, b, A, B))


def test_linear_function_matches_functional_oracle_fp32():
    case = _linear_case(torch.float32, (64, 48), 40, 8)
    x, w, b, A, B = (t.detach().requires_grad_() for t in case)
    y = _linear_autograd.adapted_linear(x, w, b, A, B, 2.0)
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
        y = _linear_autograd.adapted_linear(x, w, b, A, B, 1.0)
        ref = F_.lora_linear(x, w, b, A, B, 1.0)
    assert y.dtype == torch.bfloat16
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2, atol=5e-2)
    y.float().sum().backward()
    assert A.grad.dtype == torch.float32 and B.grad.dtype == torch.float32


@pytest.mark.parametrize("grad_off", [torch.no_grad, torch.inference_mode])
@pytest.mark.parametrize("autocast", [False, True])
def test_linear_function_without_grad_gives_the_same_values(grad_off, autocast):
    # Without grad the products run outside the autograd function: the same ops, so the same bits.
    x, w, b, A, B = (t.detach() for t in _linear_case(torch.float32, (2, 16, 64), 48, 4))
    with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
        with_grad = _linear_autograd.adapted_linear(x, w.requires_grad_(), b, A, B, 1.5)
        with grad_off():
            y = _linear_autograd.adapted_linear(x, w, b, A, B, 1.5)
        ref = F_.lora_linear(x, w, b, A, B, 1.5)
    assert with_grad.grad_fn is not None and y.grad_fn is None
    assert y.dtype == with_grad.dtype == (torch.bfloat16 if autocast else torch.float32)
    assert torch.equal(y, with_grad.detach())
    torch.testing.assert_close(y.float(), ref.float(), rtol=2e-2 if autocast else 1e-5, atol=5e-2 if autocast else 1e-5)


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


@pytest.mark.parametrize("shape", [(5, 3), (2, 5, 3), (2, 4, 5, 3)])
@pytest.mark.parametrize("bias", [True, False])
def test_linear_output_modified_in_place(shape, bias):
    torch.manual_seed(0)
    model = nn.Sequential(nn.Linear(3, 6, bias=bias), nn.ReLU(inplace=True), nn.Linear(6, 2))
    reference = nn.Sequential(nn.Linear(3, 6, bias=bias), nn.ReLU(), nn.Linear(6, 2))
    reference.load_state_dict(model.state_dict())
    peftlite.wrap(model, "0", rank=2)
    with torch.no_grad():
        model[0].lora.default.B.normal_()
    x = torch.randn(*shape)
    model(x).square().sum().backward()  # raised "Output 0 of _LowRankLinear is a view and is being modified"

    pair = model[0].lora.default
    A, B = pair.A.detach().requires_grad_(), pair.B.detach().requires_grad_()
    h = torch.relu(nn.functional.linear(x, reference[0].weight + pair.scale * B @ A, reference[0].bias))
    reference[2](h).square().sum().backward()
    torch.testing.assert_close(pair.A.grad, A.grad, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(pair.B.grad, B.grad, rtol=1e-5, atol=1e-6)
