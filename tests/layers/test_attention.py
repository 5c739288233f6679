"""Adapters on layers whose weight a parent reads directly are never silently bypassed."""

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import peftlite
from conftest import randomize_adapters
from peftlite.layers import AdaptedLayer


def lora_tensors(model):
    return {n: p for n, p in model.named_parameters() if ".lora." in f".{n}"}


def assert_all_grads_nonzero(model, loss):
    loss.backward()
    tensors = lora_tensors(model)
    assert tensors
    zero = [n for n, p in tensors.items() if p.grad is None or not bool(p.grad.abs().sum() > 0)]
    assert not zero, f"{len(zero)} of {len(tensors)} adapter tensors got no gradient: {zero[:5]}"
    return len(tensors)


def test_swin_t_qkv_and_proj_adapters_get_gradients():
    torch.manual_seed(0)
    model = torchvision.models.swin_t(num_classes=4)
    peftlite.wrap(model, ["*.attn.qkv", "*.attn.proj"], rank=2)
    randomize_adapters(model)
    x = torch.randn(1, 3, 64, 64)
    n = assert_all_grads_nonzero(model, model(x).square().sum())
    assert n == 48  # 12 blocks x (qkv, proj) x (A, B)
    model.eval()
    with torch.no_grad():
        unmerged = model(x)
        peftlite.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)


def test_vit_b_32_multihead_attention_adapters_get_gradients():
    torch.manual_seed(0)
    model = torchvision.models.vit_b_32(num_classes=4)
    nn.init.normal_(model.heads.head.weight, std=0.02)  # torchvision zero-inits it, which zeroes every grad
    peftlite.wrap(model, nn.MultiheadAttention, rank=2)
    randomize_adapters(model, std=0.01)
    x = torch.randn(1, 3, 224, 224)
    n = assert_all_grads_nonzero(model, model(x).square().sum())
    assert n == 12 * 2 * 2  # 12 layers x (in_proj, out_proj) x (A, B)
    model.eval()
    with torch.no_grad():  # the eval fast path reads the same attributes
        unmerged = model(x)
        peftlite.merge(model)
        torch.testing.assert_close(model(x), unmerged, rtol=1e-4, atol=1e-5)
        peftlite.unmerge(model)
        assert torch.equal(model(x), unmerged)


def mha_reference(mha, pairs, x, scale):
    """nn.MultiheadAttention's math on explicitly merged weights (a fresh module, no peftlite)."""
    ref = nn.MultiheadAttention(mha.embed_dim, mha.num_heads, kdim=mha.kdim, vdim=mha.vdim, batch_first=True)
    sd = {k: v.clone() for k, v in mha.state_dict().items() if ".lora." not in f".{k}" and "_extra_state" not in k}
    for slot, (A, B) in pairs.items():
        sd[slot] = sd[slot] + scale * B @ A
    ref.load_state_dict(sd)
    return ref(x, x, x, need_weights=False)[0]


@pytest.mark.parametrize("kdim", [None, 6], ids=["packed", "separate-qkv"])
def test_multihead_attention_as_a_target(kdim):
    torch.manual_seed(0)
    mha = nn.MultiheadAttention(8, 2, kdim=kdim, vdim=kdim, batch_first=True)
    model = nn.Sequential()
    model.add_module("attn", mha)
    peftlite.wrap(model, "attn", rank=3)
    randomize_adapters(model, std=0.3)
    slots = ["in_proj_weight"] if kdim is None else ["q_proj_weight", "k_proj_weight", "v_proj_weight"]
    assert sorted(mha.pairs("default")) == sorted(slots)
    assert isinstance(mha.out_proj, AdaptedLayer)
    pairs = {s: (p.A.detach(), p.B.detach()) for s, p in mha.pairs("default").items()}
    out = mha.out_proj.lora.default
    pairs_out = {"out_proj.weight": (out.A.detach(), out.B.detach())}
    if kdim is None:
        x = torch.randn(2, 5, 8)
        got = mha(x, x, x, need_weights=False)[0]
        want = mha_reference(mha, {**pairs, **pairs_out}, x, 1.0)
        torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-6)
    else:
        q, kv = torch.randn(2, 5, 8), torch.randn(2, 4, 6)
        got = mha(q, kv, kv, need_weights=False)[0]
        sd = {k: v for k, v in mha.state_dict().items() if ".lora." not in f".{k}" and "_extra_state" not in k}
        for slot, (A, B) in {**pairs, **pairs_out}.items():
            sd[slot] = sd[slot] + B @ A
        ref = nn.MultiheadAttention(8, 2, kdim=6, vdim=6, batch_first=True)
        ref.load_state_dict(sd)
        torch.testing.assert_close(got, ref(q, kv, kv, need_weights=False)[0], rtol=1e-5, atol=1e-6)
    peftlite.unwrap(model, merge=True)
    assert type(mha) is nn.MultiheadAttention
    assert type(mha.out_proj) is nn.modules.linear.NonDynamicallyQuantizableLinear


def test_out_proj_is_adapted_once():
    model = nn.Sequential()
    model.add_module("attn", nn.MultiheadAttention(8, 2))
    peftlite.wrap(model, ["attn", "attn.out_proj", nn.Linear], rank=2)
    assert len([n for n in model.state_dict() if n.endswith(".A")]) == 2


def test_direct_weight_readers_see_the_adapter():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    peftlite.wrap(model, "0", rank=2)
    randomize_adapters(model, std=0.5)
    x = torch.randn(2, 4)
    torch.testing.assert_close(F.linear(x, lin.weight, lin.bias), model(x))
    with peftlite.disabled(model):
        assert lin.weight is lin._parameters["weight"]
    peftlite.merge(model)
    assert lin.weight is lin._parameters["weight"]


def test_in_place_write_to_effective_weight_is_refused():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    peftlite.wrap(model, "0", rank=2)
    before = lin._parameters["weight"].clone()
    for write in (lambda w: nn.init.zeros_(w), lambda w: w.mul_(2), lambda w: w.__setitem__(0, 1.0),
                  lambda w: w.copy_(torch.ones(3, 4))):
        with pytest.raises(RuntimeError, match="effective weight"):
            with torch.no_grad():
                write(lin.weight)
    assert torch.equal(lin._parameters["weight"], before)
    with peftlite.disabled(model), torch.no_grad():  # the documented way to change the base weight
        nn.init.zeros_(lin.weight)
    assert not lin._parameters["weight"].any()


def test_missing_weight_raises_attribute_error():
    lin = nn.Linear(4, 3)
    model = nn.Sequential(lin)
    peftlite.wrap(model, "0", rank=2)
    del lin._parameters["weight"]
    assert not hasattr(lin, "weight")
    with pytest.raises(AttributeError, match="weight"):
        _ = lin.weight


class SameConv(nn.Conv2d):
    """Like timm's Conv2dSame: its own forward, reading self.weight (TF-style dynamic 'same' padding)."""

    def forward(self, x):
        ih, iw = x.shape[-2:]
        kh, kw = self.weight.shape[-2:]
        ph = max((-(ih // -self.stride[0]) - 1) * self.stride[0] + (kh - 1) * self.dilation[0] + 1 - ih, 0)
        pw = max((-(iw // -self.stride[1]) - 1) * self.stride[1] + (kw - 1) * self.dilation[1] + 1 - iw, 0)
        x = F.pad(x, [pw // 2, pw - pw // 2, ph // 2, ph - ph // 2])
        return F.conv2d(x, self.weight, self.bias, self.stride, 0, self.dilation, self.groups)


class StdConv(nn.Conv2d):
    """Like timm's StdConv2d: weight standardisation inside forward."""

    def forward(self, x):
        w = F.batch_norm(self.weight.reshape(1, self.out_channels, -1), None, None, training=True,
                         momentum=0.0, eps=1e-6).reshape_as(self.weight)
        return F.conv2d(x, w, self.bias, self.stride, self.padding, self.dilation, self.groups)


class Opaque(nn.Conv2d):
    def forward(self, x):
        return F.conv2d(x, self._parameters["weight"])


@pytest.mark.parametrize("cls", [SameConv, StdConv])
def test_subclass_with_own_forward_keeps_its_semantics(cls):
    torch.manual_seed(0)
    conv = cls(3, 4, 3, stride=2)
    model = nn.Sequential(conv)
    x = torch.randn(1, 3, 9, 9)
    peftlite.wrap(model, nn.Conv2d, rank=2)
    assert type(conv).__name__ == f"Lora{cls.__name__}" and isinstance(conv, cls)
    randomize_adapters(model, std=0.3)
    pair = conv.lora.default
    ref = cls(3, 4, 3, stride=2)
    with torch.no_grad():
        ref.weight.copy_(conv._parameters["weight"] + (pair.B @ pair.A).reshape(4, 3, 3, 3))
        ref.bias.copy_(conv.bias)
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)
    assert_all_grads_nonzero(model, model(x).square().sum())
    peftlite.unwrap(model, merge=True)
    assert type(conv) is cls
    torch.testing.assert_close(model(x), ref(x), rtol=1e-5, atol=1e-6)


def test_subclass_whose_semantics_cannot_be_kept_is_refused():
    model = nn.Sequential(Opaque(3, 4, 3))
    with pytest.raises(TypeError, match="Opaque overrides forward and never reads weight"):
        peftlite.wrap(model, nn.Conv2d)
    assert type(model[0]) is Opaque
