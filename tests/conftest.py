import os

import pytest
import torch
from hypothesis import settings

os.environ.setdefault("HF_HUB_OFFLINE", "1")
settings.register_profile("peftlite", deadline=None, max_examples=40, derandomize=True)
settings.load_profile("peftlite")
torch.set_num_threads(min(2, torch.get_num_threads()))


def randomize_adapters(model, std=0.05, seed=0):
    """Give every adapter a non-zero B (and a fresh A), so merges change the weights."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, p in model.named_parameters():
            if ".lora." in f".{name}":
                p.copy_(torch.randn(p.shape, generator=g, dtype=torch.float32).to(p.dtype) * std)
    return model


def assert_matches_reference(y, ref, inputs, tol, grad_tol):
    """y equals ref within tol (rtol, atol), and so do their gradients with respect to inputs, under one random
    output gradient, within grad_tol."""
    torch.testing.assert_close(y, ref, rtol=tol[0], atol=tol[1])
    g = torch.randn_like(y)
    for a, b in zip(torch.autograd.grad(y, inputs, g), torch.autograd.grad(ref, inputs, g), strict=True):
        torch.testing.assert_close(a, b, rtol=grad_tol[0], atol=grad_tol[1])


def snapshot(model):
    """Every state_dict tensor (cloned) and every module's class, by name."""
    state = {k: v.detach().clone() for k, v in model.state_dict().items()}
    classes = {n: type(m) for n, m in model.named_modules()}
    grads = {n: p.requires_grad for n, p in model.named_parameters()}
    return state, classes, grads


def bits_equal(a, b):
    """Bit-for-bit equality (NaN payloads and signed zeros included)."""
    if a.shape != b.shape or a.dtype != b.dtype:
        return False
    return torch.equal(a.contiguous().flatten().view(torch.uint8), b.contiguous().flatten().view(torch.uint8))


def assert_unchanged(model, snap):
    state, classes, grads = snap
    now = model.state_dict()
    assert list(now) == list(state), "state_dict keys changed"
    for k, v in state.items():
        assert bits_equal(now[k], v), f"{k} changed"
    assert {n: type(m) for n, m in model.named_modules()} == classes
    assert {n: p.requires_grad for n, p in model.named_parameters()} == grads


def group_of_param(groups):
    """id(parameter) -> its optimizer group, checking that no parameter is in two groups."""
    out = {}
    for g in groups:
        for p in g["params"]:
            assert id(p) not in out, f"a parameter is in two groups ({g['name']})"
            out[id(p)] = g
    return out


@pytest.fixture
def rng():
    return torch.Generator().manual_seed(1234)
