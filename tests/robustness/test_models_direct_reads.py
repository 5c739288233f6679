"""Direct reads of an adapted layer's weight: metadata is free, values are W + scale·ΔW with gradients.

The effective-weight property returns a lazy ``EffectiveWeight``: its dtype, shape, device and
requires_grad need no computation (T5 reads ``wo.weight.dtype`` before each call of ``wo``), and its
values are built once, when first used, with autograd to A and B.
"""

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlite
from conftest import randomize_adapters
from peftlite import functional
from peftlite.layers._guard import EffectiveWeight


@pytest.fixture
def built(monkeypatch):
    """Counts the W-sized effective weights built."""
    calls = []
    original = functional.effective_weight

    def counting(*args):
        calls.append(1)
        return original(*args)

    monkeypatch.setattr(functional, "effective_weight", counting)
    return calls


def adapted_linear(out=3, fan_in=4):
    torch.manual_seed(0)
    lin = nn.Linear(fan_in, out)
    model = peftlite.wrap(nn.Sequential(lin), "0", rank=2)
    randomize_adapters(model, std=0.5)
    return model, lin


def test_metadata_reads_build_nothing(built):
    _, lin = adapted_linear()
    w = lin.weight
    assert isinstance(w, torch.Tensor) and isinstance(w, EffectiveWeight)
    assert (w.dtype, w.shape, w.device, w.ndim) == (torch.float32, (3, 4), torch.device("cpu"), 2)
    assert (w.size(0), w.dim(), w.numel(), len(w)) == (3, 2, 12, 3)
    assert w.requires_grad and w.is_floating_point() and w.is_contiguous()
    assert w.stride() == (4, 1) and torch.is_floating_point(w) and not w.is_meta
    assert built == []
    with torch.no_grad():
        assert not lin.weight.requires_grad
    assert built == []


def test_values_are_built_once_with_gradients_to_the_adapter(built):
    model, lin = adapted_linear()
    x = torch.randn(5, 4)
    w = lin.weight
    y = F.linear(x, w, lin.bias)
    z = x @ w.t()  # a second use: the same values, not built again
    assert built == [1]
    assert type(y) is torch.Tensor and y.grad_fn is not None
    torch.testing.assert_close(y, model(x))
    torch.testing.assert_close(z + lin.bias, model(x))
    (y.square().sum() + z.sum()).backward()
    pair = lin.lora.default
    assert pair.A.grad is not None and pair.A.grad.abs().sum() > 0 and pair.B.grad.abs().sum() > 0
    ref_A, ref_B = pair.A.detach().clone().requires_grad_(), pair.B.detach().clone().requires_grad_()
    ref_w = functional.effective_weight(lin._parameters["weight"], ref_A, ref_B, pair.scale)
    (F.linear(x, ref_w, lin.bias).square().sum() + (x @ ref_w.t()).sum()).backward()
    torch.testing.assert_close(pair.A.grad, ref_A.grad)
    torch.testing.assert_close(pair.B.grad, ref_B.grad)


def test_grad_mode_of_the_read_is_kept():
    _, lin = adapted_linear()
    with torch.no_grad():
        w = lin.weight
    assert not (w * 2).requires_grad  # used outside no_grad, built as read: without a graph
    w = lin.weight
    with torch.no_grad():
        assert (w * 2).requires_grad is False  # the op itself runs under no_grad
    assert w.materialize().requires_grad


@pytest.mark.parametrize("write", [
    lambda w: nn.init.zeros_(w), lambda w: w.mul_(2), lambda w: w.__setitem__(0, 1.0),
    lambda w: w.copy_(torch.ones(3, 4)), lambda w: torch.add(w, 1, out=w), lambda w: setattr(w, "data", w + 1),
    lambda w: w.requires_grad_(False),
])
def test_in_place_writes_are_refused(write):
    _, lin = adapted_linear()
    before = lin._parameters["weight"].clone()
    with pytest.raises(RuntimeError, match="effective weight"), torch.no_grad():
        write(lin.weight)
    assert torch.equal(lin._parameters["weight"], before)


def test_a_read_kept_across_a_change_is_refused_not_stale():
    model, lin = adapted_linear()
    w = lin.weight
    kept = lin.weight.clone()  # values at the read
    with torch.no_grad():
        lin.lora.default.B.add_(1.0)  # as an optimizer step would
    with pytest.raises(RuntimeError, match="read layer.weight again"):
        w + 0
    peftlite.merge(model)
    assert lin.weight is lin._parameters["weight"]
    assert not torch.equal(lin.weight, kept)


def test_below_torch_function_values_are_right_and_gradients_refused():
    _, lin = adapted_linear()
    x = torch.randn(2, 4)
    expected = F.linear(x, lin.weight.detach())
    with torch.no_grad():
        w = lin.weight
    with torch._C.DisableTorchFunctionSubclass():  # as a C++ caller would reach it
        torch.testing.assert_close(torch.mm(x, w.t()), expected)
    w = lin.weight
    with torch._C.DisableTorchFunctionSubclass(), pytest.raises(RuntimeError, match="no gradient"):
        torch.mm(x, w.t())
    with torch._C.DisableTorchFunctionSubclass(), torch.no_grad(), pytest.raises(RuntimeError, match="effective"):
        w.mul_(2)


def test_compiled_parent_reads_the_plain_weight():
    class Parent(nn.Module):
        def __init__(self):
            super().__init__()
            self.proj = nn.Linear(8, 8)

        def forward(self, x):
            x = x.to(self.proj.weight.dtype)
            return F.linear(x, self.proj.weight, self.proj.bias)

    torch.manual_seed(0)
    model = peftlite.wrap(Parent(), "proj", rank=2)
    randomize_adapters(model, std=0.3)
    x = torch.randn(4, 8)
    expected = model(x)
    compiled = torch.compile(model, backend="eager", fullgraph=True)
    y = compiled(x)
    torch.testing.assert_close(y, expected)
    y.sum().backward()
    assert model.proj.lora.default.A.grad.abs().sum() > 0


def test_t5_reads_only_metadata_and_matches_the_merged_model(built):
    transformers = pytest.importorskip("transformers")
    torch.manual_seed(0)
    model = transformers.T5Model(transformers.T5Config(
        num_layers=2, d_model=16, d_kv=8, num_heads=2, d_ff=32, vocab_size=64, decoder_start_token_id=0)).eval()
    peftlite.wrap(model, nn.Linear, rank=2)
    randomize_adapters(model, std=0.1)
    ids = torch.randint(0, 64, (2, 8))
    with torch.no_grad():
        out = model(input_ids=ids, decoder_input_ids=ids[:, :3]).last_hidden_state
        assert built == []  # T5's FFNs read wo.weight.dtype only
        peftlite.merge(model)
        torch.testing.assert_close(model(input_ids=ids, decoder_input_ids=ids[:, :3]).last_hidden_state, out,
                                   rtol=1e-4, atol=1e-5)
    peftlite.unmerge(model)
    model.train()
    loss = model(input_ids=ids, decoder_input_ids=ids[:, :3]).last_hidden_state.square().sum()
    loss.backward()
    wo = model.encoder.block[0].layer[1].DenseReluDense.wo.lora.default
    assert wo.A.grad.abs().sum() > 0 and wo.B.grad.abs().sum() > 0


def test_dora_direct_read_keeps_gradients_to_the_magnitude():
    torch.manual_seed(0)
    lin = nn.Linear(4, 3)
    model = peftlite.wrap(nn.Sequential(lin), "0", rank=2, variant="dora")
    randomize_adapters(model, std=0.3)
    x = torch.randn(5, 4)
    w = lin.weight
    assert w.dtype == torch.float32 and w.requires_grad
    y = F.linear(x, w, lin.bias)
    torch.testing.assert_close(y, model(x))
    y.sum().backward()
    assert lin.lora.default.magnitude.grad.abs().sum() > 0
