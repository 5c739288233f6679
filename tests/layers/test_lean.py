"""Lean training: what a step keeps for backward, and that every lean path computes what the reference does.

- adapted layers keep their input once and nothing the base layer would not keep; frozen BatchNorms keep
  only a (C,) vector; no W-sized tensor is kept;
- LoRA dropout draws a seeded mask that backward regenerates: the same values and gradients as a
  reference given that mask, and no dropped copy of the input kept;
- ``nn.MultiheadAttention``'s lean training forward (adapted, and the frozen ``LeanMultiheadAttention``)
  against the stock module on merged weights, over its options;
- bf16 autocast gradients against fp32 within bf16's tolerance.
"""

from __future__ import annotations

import copy
import itertools

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import peftlite
from conftest import randomize_adapters
from peftlite.functional import ConvGeometry
from peftlite.kernels.dropout import keep_mask, new_seed
from peftlite.layers import LeanMultiheadAttention
from peftlite.layers.linear import LeanLinear

# torch's own deprecation warning for a bool padding mask beside a float attention mask (both modules warn)
pytestmark = pytest.mark.filterwarnings("ignore:Support for mismatched key_padding_mask")


def saved_storages(run) -> dict[int, int]:
    """``{storage pointer: bytes}`` of every tensor autograd saves while ``run()`` builds the graph."""
    seen: dict[int, int] = {}

    def pack(t):
        s = t.untyped_storage()
        seen[s.data_ptr()] = s.nbytes()
        return t

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        out = run()
    return seen, out


def pointers(tensors) -> set[int]:
    return {t.untyped_storage().data_ptr() for t in tensors}


class ConvBlock(nn.Module):
    """conv-BN-ReLU-conv-BN + skip, pooled into a Linear: the shape of a ResNet block."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(16, 32, 3, padding=1, bias=False), nn.BatchNorm2d(32)
        self.conv2, self.bn2 = nn.Conv2d(32, 16, 1, bias=False), nn.BatchNorm2d(16)
        self.relu1, self.relu2, self.fc = nn.ReLU(), nn.ReLU(), nn.Linear(16, 10)

    def forward(self, x):
        y = self.relu1(self.bn1(self.conv1(x)))
        y = self.bn2(self.conv2(y)) + x
        return self.fc(self.relu2(y).mean((2, 3)))


@pytest.mark.parametrize("size", [8, 32], ids=["activations-path", "merged-path"])
def test_a_wrapped_step_keeps_adapted_inputs_and_no_batchnorm_input(size):
    torch.manual_seed(0)
    model = peftlite.wrap(ConvBlock(), targets=[nn.Conv2d, nn.Linear], rank=2)
    randomize_adapters(model)
    inputs, relu_outputs = {}, []
    for name in ("conv1", "conv2", "fc", "bn1", "bn2"):
        getattr(model, name).register_forward_pre_hook(lambda m, a, n=name: inputs.__setitem__(n, a[0]))
    for relu in (model.relu1, model.relu2):  # a ReLU keeps its output, as in any step
        relu.register_forward_hook(lambda m, a, out: relu_outputs.append(out))
    params = pointers(model.parameters()) | pointers(model.buffers())
    x = torch.randn(4, 16, size, size)
    saved, out = saved_storages(lambda: model(x))
    kept = {p: n for p, n in saved.items() if p not in params}
    adapted_inputs = pointers(inputs[n] for n in ("conv1", "conv2", "fc"))
    assert not pointers(inputs[n] for n in ("bn1", "bn2")) & set(kept), "a frozen BatchNorm kept its input"
    weights = {p.numel() * p.element_size() for p in model.parameters() if p.dim() > 1}
    big = {p: n for p, n in kept.items() if n > 4 * 16 * 4 * 4}  # beyond r-sized terms and (C,) vectors
    assert not set(big) - adapted_inputs - pointers(relu_outputs), f"kept beyond the adapted layers' inputs: {big}"
    assert not {n for n in big.values()} & weights - {x.nbytes}, "a W-sized tensor was kept"
    out.sum().backward()  # and it trains
    assert all(p.grad is not None for n, p in model.named_parameters() if p.requires_grad)


def test_frozen_batchnorm_passes_the_stock_gradient():
    torch.manual_seed(0)
    base = torchvision.models.resnet18(num_classes=3).double().eval()
    ours = peftlite.wrap(copy.deepcopy(base), targets="layer4.*", rank=2).train()
    for p in base.parameters():
        p.requires_grad_(False)
    x = torch.randn(2, 3, 32, 32, dtype=torch.float64, requires_grad=True)
    grads = [torch.autograd.grad(m(x).square().sum(), x)[0] for m in (base, ours)]  # B = 0: same function
    torch.testing.assert_close(grads[1], grads[0], rtol=1e-12, atol=1e-12)


def test_batchnorm_with_trained_affine_keeps_the_stock_path():
    torch.manual_seed(0)
    model = peftlite.wrap(ConvBlock(), targets="conv1", trainable="bn1", rank=2)
    model.bn1.weight.grad = None
    model(torch.randn(2, 16, 8, 8)).sum().backward()
    assert model.bn1.weight.grad is not None and bool(model.bn1.weight.grad.abs().sum() > 0)


def test_linear_on_a_transposed_input_matches_the_oracle():
    torch.manual_seed(0)
    layer = peftlite.wrap(nn.Sequential(nn.Linear(6, 5)).double(), "0", rank=3)[0]
    randomize_adapters(layer, std=0.3)
    x = torch.randn(7, 4, 6, dtype=torch.float64).transpose(0, 1).requires_grad_()  # (4, 7, 6), non-contiguous
    pair = layer.lora["default"]
    leaves = (x, pair.A, pair.B)
    y = layer(x)
    ref = peftlite.functional.lora_linear(x, layer._parameters["weight"], layer.bias, pair.A, pair.B, pair.scale)
    torch.testing.assert_close(y, ref, rtol=1e-12, atol=1e-12)
    for u, v in zip(torch.autograd.grad(y.square().sum(), leaves), torch.autograd.grad(ref.square().sum(), leaves),
                    strict=True):
        torch.testing.assert_close(u, v, rtol=1e-12, atol=1e-12)


# ---- LoRA dropout --------------------------------------------------------------------------------

DROPOUT_LAYERS = {
    "linear": (lambda: nn.Linear(7, 5), (3, 6, 7)),
    "conv-activations": (lambda: nn.Conv2d(6, 8, 3, padding=1), (2, 6, 9, 9)),
    "conv-grouped": (lambda: nn.Conv2d(6, 8, 3, stride=2, padding=2, dilation=2, groups=2), (2, 6, 9, 9)),
    "conv-strided-pointwise": (lambda: nn.Conv2d(32, 32, 1, stride=2), (3, 32, 18, 17)),  # the activations path
    "conv-depthwise-dense": (lambda: nn.Conv2d(8, 8, 7, padding=3, groups=8), (2, 8, 30, 30)),
    "conv-reflect": (lambda: nn.Conv2d(4, 4, 3, padding=1, padding_mode="reflect"), (2, 4, 7, 7)),
}


@pytest.mark.parametrize("train_base", [False, True], ids=["frozen-base", "trained-base"])
@pytest.mark.parametrize("kind", list(DROPOUT_LAYERS))
def test_dropout_matches_a_reference_given_the_same_mask(kind, train_base):
    _check_dropout_against_reference(kind, train_base)


@pytest.mark.parametrize("chunk", [1, 5], ids=["one-row-or-sample", "a-few-rows"])
@pytest.mark.parametrize("kind", ["linear", "conv-activations", "conv-grouped", "conv-strided-pointwise"])
def test_dropout_in_chunks_takes_the_mask_of_the_whole_input(kind, chunk, monkeypatch):
    """The layers drop their input a block of rows / samples at a time: many blocks here, the same result."""
    from peftlite.kernels import dropout
    monkeypatch.setattr(dropout, "SLICE_BYTES", chunk * 8 * 7)  # chunk rows of 7 doubles; one sample of the convs
    _check_dropout_against_reference(kind, False)


def _check_dropout_against_reference(kind, train_base):
    make, shape = DROPOUT_LAYERS[kind]
    torch.manual_seed(0)
    layer = make().double()
    p = 0.3
    model = peftlite.wrap(nn.Sequential(layer), "0", rank=3, dropout=p, trainable="0.weight" if train_base else None)
    randomize_adapters(model, std=0.3)
    x = torch.randn(*shape, dtype=torch.float64, requires_grad=True)
    pair, w = layer.lora["default"], layer._parameters["weight"]
    leaves = [x, pair.A, pair.B] + [w] * train_base
    torch.manual_seed(5)
    y = model(x)
    got = [y, *torch.autograd.grad(y.square().sum(), leaves)]

    torch.manual_seed(5)
    seed = new_seed()  # the seed the layer drew
    xd = x * keep_mask(x.shape, seed, p, "cpu") / (1 - p)
    if isinstance(layer, nn.Conv2d):
        geom = ConvGeometry.of(layer)
        delta = (pair.B @ pair.A).reshape(w.shape)
        ref = peftlite.functional.conv2d(x, w, layer.bias, geom) + pair.scale * peftlite.functional.conv2d(
            xd, delta, None, geom)
    else:
        ref = F.linear(x, w, layer.bias) + pair.scale * F.linear(F.linear(xd, pair.A), pair.B)
    want = [ref, *torch.autograd.grad(ref.square().sum(), leaves)]
    if kind == "conv-reflect":  # padded by the conv itself: torch's dropout, another mask; check it trains
        assert all(g is not None and bool(g.abs().sum() > 0) for g in got[1:])
        return
    for u, v in zip(got, want, strict=True):
        torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("kind", ["linear", "conv-activations", "conv-depthwise-dense"])
def test_dropout_keeps_no_dropped_copy(kind):
    make, shape = DROPOUT_LAYERS[kind]
    kept = {}
    for p in (0.0, 0.3):
        torch.manual_seed(0)
        model = peftlite.wrap(nn.Sequential(make()), "0", rank=3, dropout=p)
        params = pointers(model.parameters())
        x = torch.randn(*shape, requires_grad=True)
        saved, _ = saved_storages(lambda m=model, x=x: m(x))
        kept[p] = sum(n for ptr, n in saved.items() if ptr not in params and n >= x.nbytes)
    assert kept[0.3] == kept[0.0]  # x itself, once; nothing else input-sized


def test_dropout_replays_under_checkpointing():
    torch.manual_seed(0)
    model = nn.Sequential(nn.Sequential(nn.Linear(8, 8), nn.GELU(), nn.Linear(8, 8)), nn.Linear(8, 2))
    peftlite.wrap(model, nn.Linear, rank=2, dropout=0.4)
    randomize_adapters(model)
    other = copy.deepcopy(model)
    peftlite.checkpointing(other, "0")
    x = torch.randn(5, 8)
    grads = []
    for m in (model, other):
        torch.manual_seed(3)
        m(x).square().sum().backward()
        grads.append([p.grad.clone() for p in m.parameters() if p.requires_grad])
    for u, v in zip(*grads, strict=True):
        assert torch.equal(u, v)


# ---- nn.MultiheadAttention -----------------------------------------------------------------------

E, H, N, L, S = 8, 2, 3, 5, 4


def _mha_inputs(mode, batch_first, kdim, unbatched, gen):
    def mk(length, dim):
        shape = (length, dim) if unbatched else ((N, length, dim) if batch_first else (length, N, dim))
        return torch.randn(*shape, generator=gen, dtype=torch.float64, requires_grad=True)

    q = mk(L, E)
    if mode == "self":
        return q, q, q
    if mode == "shared-kv":
        k = mk(S, kdim or E)
        return q, k, k
    return q, mk(S, kdim or E), mk(S, kdim or E)


def _mha_masks(mode, mask, padding, causal, unbatched, gen):
    length = L
    src = L if mode == "self" else S
    attn = None
    if mask == "bool":
        attn = torch.rand(length, src, generator=gen) > 0.7
        attn[:, 0] = False
    elif mask == "float3d":
        attn = torch.randn(N * H, length, src, generator=gen, dtype=torch.float64)
    if causal:
        attn = torch.triu(torch.ones(length, src, dtype=torch.bool), 1)
    kpm = None
    if padding:
        kpm = torch.rand(src, generator=gen) > 0.7 if unbatched else torch.rand(N, src, generator=gen) > 0.7
        kpm[..., 0] = False
    return attn, kpm


MHA_CASES = [c for c in itertools.product(
    [True, False],  # batch_first
    ["self", "shared-kv", "separate"],
    [None, 6],  # kdim
    [None, "bool", "float3d"],  # attn_mask
    [False, True],  # key_padding_mask
    [False, True],  # need_weights
    [False, True],  # is_causal
    [False, True],  # unbatched
) if not (c[2] and c[1] == "self") and not (c[6] and (c[3] or c[1] != "self")) and not (c[7] and c[3] == "float3d")]


def _run(mha, args, kwargs):
    out, weights = mha(*args, **kwargs)
    loss = out.square().sum() + (0 if weights is None else 0.3 * weights.square().sum())
    leaves = list({id(t): t for t in args}.values()) + [p for p in mha.parameters() if p.requires_grad]
    return [out, weights, *torch.autograd.grad(loss, leaves, allow_unused=True)]


def _assert_same(got, want):
    assert len(got) == len(want)
    for u, v in zip(got, want, strict=True):
        assert (u is None) == (v is None)
        if u is not None:
            torch.testing.assert_close(u, v, rtol=1e-10, atol=1e-10)


@pytest.mark.parametrize("case", MHA_CASES[::3], ids=lambda c: "-".join(map(str, c)))
def test_lean_attention_matches_the_stock_module(case):
    batch_first, mode, kdim, mask, padding, need_weights, causal, unbatched = case
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=batch_first).double()
    lean = copy.deepcopy(stock)
    lean.__class__ = LeanMultiheadAttention
    args = _mha_inputs(mode, batch_first, kdim, unbatched, gen)
    attn, kpm = _mha_masks(mode, mask, padding, causal, unbatched, gen)
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, is_causal=causal)
    _assert_same(_run(lean, args, kwargs), _run(stock, args, kwargs))


def _merged_reference(stock, ours, args, kwargs):
    """``_run`` of the stock module on ``W + scale·B A`` for each of ours' adapted weights (autograd to A, B)."""
    ref = copy.deepcopy(stock)
    for p in ref.parameters():
        p.requires_grad_(False)
    slots = [(ref, slot, pair) for slot, pair in ours.pairs("default").items()]
    for owner, name, pair in slots + [(ref.out_proj, "weight", ours.out_proj.lora["default"])]:
        base = owner._parameters.pop(name)
        setattr(owner, name, peftlite.functional.effective_weight(base, pair.A, pair.B, pair.scale))
    out, weights = ref(*args, **kwargs)
    loss = out.square().sum() + (0 if weights is None else 0.3 * weights.square().sum())
    leaves = list({id(t): t for t in args}.values()) + [p for p in ours.parameters() if p.requires_grad]
    return [out, weights, *torch.autograd.grad(loss, leaves, allow_unused=True)]


@pytest.mark.parametrize("case", MHA_CASES[1::5], ids=lambda c: "-".join(map(str, c)))
def test_adapted_attention_matches_the_stock_module_on_merged_weights(case):
    batch_first, mode, kdim, mask, padding, need_weights, causal, unbatched = case
    gen = torch.Generator().manual_seed(0)
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(E, H, kdim=kdim, vdim=kdim, batch_first=batch_first).double()
    model = peftlite.wrap(nn.Sequential(copy.deepcopy(stock)), "0", rank=3)
    randomize_adapters(model, std=0.3)
    args = _mha_inputs(mode, batch_first, kdim, unbatched, gen)
    attn, kpm = _mha_masks(mode, mask, padding, causal, unbatched, gen)
    kwargs = dict(key_padding_mask=kpm, attn_mask=attn, need_weights=need_weights, is_causal=causal)
    _assert_same(_run(model[0], args, kwargs), _merged_reference(stock, model[0], args, kwargs))


def test_attention_dropout_draws_as_the_stock_module():
    torch.manual_seed(0)
    stock = nn.MultiheadAttention(E, H, dropout=0.3, batch_first=True).double().train()
    lean = copy.deepcopy(stock)
    lean.__class__ = LeanMultiheadAttention
    x = torch.randn(N, L, E, dtype=torch.float64, requires_grad=True)
    for need_weights in (False, True):
        results = []
        for m in (stock, lean):
            torch.manual_seed(1)
            results.append(_run(m, (x, x, x), dict(need_weights=need_weights)))
        _assert_same(*results)


def test_wrap_gives_unadapted_attention_the_lean_class_and_unwrap_takes_it_back():
    model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=2, num_heads=2,
                                                 hidden_dim=16, mlp_dim=32, num_classes=3)
    peftlite.wrap(model, "*.mlp.*", rank=2)
    mhas = [m for m in model.modules() if isinstance(m, nn.MultiheadAttention)]
    assert mhas and all(type(m) is LeanMultiheadAttention for m in mhas)
    peftlite.wrap(model, "encoder.layers.encoder_layer_0.self_attention", rank=2, name="b")
    assert type(mhas[0]).__name__ == "LoraMultiheadAttention" and type(mhas[1]) is LeanMultiheadAttention
    peftlite.unwrap(model, merge=False)
    assert all(type(m) is nn.MultiheadAttention for m in mhas)


def test_frozen_attention_keeps_no_cast_weight_under_autocast():
    torch.manual_seed(0)
    model = peftlite.wrap(nn.Sequential(nn.MultiheadAttention(64, 4, batch_first=True), nn.Linear(64, 2)),
                          targets="1", rank=2)
    params = pointers(model.parameters())
    x = torch.randn(2, 9, 64, requires_grad=True)
    with torch.autocast("cpu", dtype=torch.bfloat16):
        saved, _ = saved_storages(lambda: model[0](x, x, x, need_weights=False)[0])
    weight_bytes = model[0].in_proj_weight.numel() * 2
    assert all(n < weight_bytes for p, n in saved.items() if p not in params)


def _mlp():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(64, 256), nn.GELU(), nn.Linear(256, 64), nn.Linear(64, 3))


def test_wrap_gives_frozen_plain_linears_the_lean_class_and_unwrap_takes_it_back():
    base = _mlp()
    model = peftlite.wrap(copy.deepcopy(base), targets="0", rank=2, heads={"3": nn.Linear(64, 3)})
    assert type(model[2]) is LeanLinear and isinstance(model[2], nn.Linear)
    assert type(model[3]) is nn.Linear  # a head trains: it stays the stock module
    assert model.state_dict().keys() >= base.state_dict().keys()
    model[2].weight.requires_grad_(True)  # unfrozen later: it trains as the stock module, and reports as one
    assert "Linear" in str(peftlite.summary(model)) and "LeanLinear" not in str(peftlite.summary(model))
    model[2].weight.requires_grad_(False)
    peftlite.wrap(model, targets="2", rank=2, name="b")  # a lean Linear can still be adapted
    assert type(model[2]).__name__ == "LoraLinear"
    peftlite.unwrap(model, merge=False)
    assert all(type(m) is nn.Linear for m in (model[0], model[2], model[3]))


@pytest.mark.parametrize("layout", ["3-D", "permuted 4-D"])
def test_frozen_linear_keeps_no_cast_weight_under_autocast_and_passes_the_stock_gradients(layout):
    """Under bf16 autocast a frozen plain Linear keeps its fp32 weight, not the bf16 copy the stock module keeps
    for ∂x; the outputs and every gradient are the stock module's to the bit (also for a strided 4-D input, as
    ConvNeXt's blocks feed their Linears)."""
    model = peftlite.wrap(_mlp(), targets="0", rank=4)
    stock = copy.deepcopy(model)
    stock[2].__class__ = stock[3].__class__ = nn.Linear
    x = torch.randn(5, 7, 64) if layout == "3-D" else torch.randn(2, 64, 3, 5)
    to_last, to_first = ((lambda t: t), (lambda t: t)) if layout == "3-D" else \
        ((lambda t: t.permute(0, 2, 3, 1)), (lambda t: t.permute(0, 3, 1, 2)))  # strided inputs and gradients
    results, kept = [], []
    for m in (model, stock):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16):
            saved, y = saved_storages(lambda m=m, xx=xx: to_first(m(to_last(xx))))
        y.float().square().sum().backward()
        results.append([y, xx.grad] + [p.grad for p in m.parameters() if p.requires_grad])
        params = pointers(m.parameters())
        kept.append(sum(n for p, n in saved.items() if p not in params))
    assert all(torch.equal(a, b) for a, b in zip(*results, strict=True))
    cast_weights = (model[2].weight.numel() + model[3].weight.numel()) * 2  # bf16 copies of the frozen Ws
    assert kept[1] - kept[0] == cast_weights


@pytest.mark.parametrize("autocast", [False, True], ids=["fp32", "bf16 autocast"])
def test_frozen_linear_on_a_transposed_input_passes_the_stock_values(autocast):
    """A strided 3-D input (what attention hands its projections) goes through one 2-D product of its copy:
    the stock module's values and ∂x, within the dtype's rounding (the product's blocking differs)."""
    model = peftlite.wrap(_mlp(), targets="0", rank=4)
    stock = copy.deepcopy(model)
    stock[2].__class__ = nn.Linear
    x = torch.randn(7, 5, 256)
    results = []
    for m in (model[2], stock[2]):
        xx = x.clone().requires_grad_()
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=autocast):
            y = m(xx.transpose(0, 1))
        y.float().square().sum().backward()
        results.append((y.float(), xx.grad))
    tol = dict(rtol=2e-2, atol=2e-2) if autocast else dict(rtol=1e-5, atol=1e-5)
    for a, b in zip(*results, strict=True):
        assert a.shape == b.shape
        torch.testing.assert_close(a, b, **tol)


# ---- bf16 autocast -------------------------------------------------------------------------------

@pytest.mark.parametrize("dropout", [0.0, 0.1])
@pytest.mark.parametrize("arch", ["conv-block", "vit"])
def test_bf16_autocast_gradients_match_fp32(arch, dropout):
    """Shallow models, so that bf16's rounding (2^-8 relative per op) does not compound through depth."""
    torch.manual_seed(0)
    if arch == "conv-block":
        model, x, targets = ConvBlock(), torch.randn(4, 16, 16, 16), [nn.Conv2d, nn.Linear]
    else:
        model = torchvision.models.VisionTransformer(image_size=32, patch_size=8, num_layers=1, num_heads=2,
                                                     hidden_dim=32, mlp_dim=64, num_classes=4)
        x, targets = torch.randn(4, 3, 32, 32), [nn.Conv2d, nn.Linear, nn.MultiheadAttention]
    peftlite.wrap(model, targets, rank=4, dropout=dropout)
    randomize_adapters(model, std=0.05)
    grads = {}
    for dtype in (torch.float32, torch.bfloat16):
        model.zero_grad()
        torch.manual_seed(2)  # the same dropout masks both times
        with torch.autocast("cpu", dtype=torch.bfloat16, enabled=dtype == torch.bfloat16):
            model(x).float().square().sum().backward()
        grads[dtype] = {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}
    for name, g32 in grads[torch.float32].items():
        g16 = grads[torch.bfloat16][name]
        assert g16.dtype == g32.dtype
        error = float((g16 - g32).norm() / g32.norm())
        assert error < 0.05, f"{name}: relative error {error:.3f}"  # bf16: 2^-8 per rounding, a few deep
