"""A layer called twice in one forward; models on the meta device; models moved while merged."""

import pytest
import torch
from torch import nn

import peftlite
from conftest import assert_unchanged, bits_equal, randomize_adapters, snapshot
from peftlite import functional


class Twice(nn.Module):
    def __init__(self):
        super().__init__()
        self.lin = nn.Linear(4, 4)
        self.out = nn.Linear(4, 2)

    def forward(self, x):
        return self.out(torch.tanh(self.lin(torch.tanh(self.lin(x)))))


def test_a_layer_called_twice_accumulates_both_gradients_and_merges_exactly():
    torch.manual_seed(0)
    model = peftlite.wrap(Twice(), "lin", rank=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(5, 4)
    model(x).square().sum().backward()
    pair = model.lin.lora.default
    A, B = pair.A.detach().clone().requires_grad_(), pair.B.detach().clone().requires_grad_()
    w, b = model.lin._parameters["weight"], model.lin.bias
    step = lambda h: torch.tanh(functional.lora_linear(h, w, b, A, B, pair.scale))  # noqa: E731
    model.out(step(step(x))).square().sum().backward()
    torch.testing.assert_close(pair.A.grad, A.grad)
    torch.testing.assert_close(pair.B.grad, B.grad)

    before = snapshot(model)
    with torch.no_grad():
        unmerged = model(x)
        peftlite.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-5, atol=1e-6)
        peftlite.unmerge(model)
    assert_unchanged(model, before)


def build():
    return nn.Sequential(nn.Linear(4, 8), nn.ReLU(), nn.Linear(8, 2))


def test_meta_model_wraps_then_loads_after_to_empty(tmp_path):
    torch.manual_seed(0)
    trained = build()
    base = {k: v.clone() for k, v in trained.state_dict().items()}
    peftlite.wrap(trained, nn.Linear, rank=2)
    randomize_adapters(trained, std=0.3)
    path = peftlite.save(trained, tmp_path / "a.safetensors")

    with torch.device("meta"):
        model = build()
    with pytest.warns(UserWarning, match="meta device .* peftlite.load"):
        peftlite.wrap(model, nn.Linear, rank=2)
    assert model[0].lora.default.A.is_meta
    assert model[0].weight.dtype == torch.float32 and model[0].weight.shape == (8, 4)  # metadata reads work
    with pytest.raises(RuntimeError, match="meta device.*to_empty"):
        peftlite.merge(model)
    model.to_empty(device="cpu")
    model.load_state_dict(base, strict=False)
    peftlite.load(model, path)
    x = torch.randn(3, 4)
    torch.testing.assert_close(model(x), trained(x))
    with torch.no_grad():
        peftlite.merge(model)
        torch.testing.assert_close(model(x), trained(x), rtol=1e-5, atol=1e-6)


def merged_model():
    torch.manual_seed(0)
    model = peftlite.wrap(build(), nn.Linear, rank=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(3, 4)
    with torch.no_grad():
        unmerged = model(x)
    before = snapshot(model)
    peftlite.merge(model)
    return model, x, unmerged, before


def test_moved_to_another_dtype_while_merged_refuses_to_unmerge_until_moved_back():
    model, x, unmerged, before = merged_model()
    model.double()
    with torch.no_grad():
        torch.testing.assert_close(model(x.double()), unmerged.double(), rtol=1e-5, atol=1e-6)  # merged runs
    moved = {k: v.clone() for k, v in model.state_dict().items()}
    for call in (peftlite.unmerge, lambda m: peftlite.unwrap(m, merge=False)):
        with pytest.raises(RuntimeError, match="merged as torch.float32 on cpu, but the weight is now torch.float64"):
            call(model)
        assert all(bits_equal(v, moved[k]) for k, v in model.state_dict().items())  # nothing unmerged
    with pytest.raises(RuntimeError, match="moved while merged"), peftlite.disabled(model):
        pass
    model[2].float()  # half moved back: still refused, and still nothing unmerged
    with pytest.raises(RuntimeError, match="unmerge 0: merged as torch.float32"):
        peftlite.unmerge(model)
    model.float()
    peftlite.unmerge(model)
    assert_unchanged(model, before)  # fp32 -> fp64 -> fp32 is lossless, so unmerge is exact again


def test_moved_to_another_dtype_while_unmerged_works():
    torch.manual_seed(0)
    model = peftlite.wrap(build(), nn.Linear, rank=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(3, 4)
    expected = model(x).double()
    model.double()
    assert model[0].lora.default.A.dtype == torch.float64 and model[0].weight.dtype == torch.float64
    torch.testing.assert_close(model(x.double()), expected, rtol=1e-6, atol=1e-6)
    with torch.no_grad():
        peftlite.merge(model)
        torch.testing.assert_close(model(x.double()), expected, rtol=1e-6, atol=1e-6)
        peftlite.unmerge(model)


def test_moved_to_another_device_while_merged_refuses_to_unmerge():
    model, _, _, _ = merged_model()
    model.to("meta")  # the device this machine always has besides the CPU
    with pytest.raises(RuntimeError, match="on cpu, but the weight is now torch.float32 on meta"):
        peftlite.unmerge(model)
    assert all(m.adapter_state.merged for _, m in peftlite.layers.adapted_layers(model))
