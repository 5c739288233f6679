"""Principal-component inits (PiSSA, OLoRA): the math against PEFT's definitions, the residual base restored
bit-exactly on every layer kind and conv geometry, the residual in the rest of the API, and bad input."""

import copy
import warnings

import pytest
import torch
from tests._geometries import GEOMETRIES
from tests.conftest import assert_unchanged, bits_equal, snapshot
from torch import nn

import peftlite
from peftlite import functional

INITS = ["pissa", "olora", "pissa_niter_4"]


def _perturb(model, std=0.05, seed=0):
    """Move the trainable adapters away from their start, as training would."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in model.parameters():
            if p.requires_grad:
                p.add_(torch.randn(p.shape, generator=g) * std)


def _state(model):
    return {k: v.clone() for k, v in model.state_dict().items()}


def _same(model, state):
    now = model.state_dict()
    return list(now) == list(state) and all(bits_equal(now[k], v) for k, v in state.items())


# ---- the math ----------------------------------------------------------------------------------------

def test_pissa_pair_is_the_scaled_principal_part():
    W = torch.randn(12, 20, dtype=torch.float64)
    A0, B0 = functional.pissa_pair(W, 5, scale=2.0)
    U, S, Vh = torch.linalg.svd(W, full_matrices=False)
    torch.testing.assert_close(2.0 * B0 @ A0, U[:, :5] @ torch.diag(S[:5]) @ Vh[:5])
    torch.testing.assert_close(B0.norm(dim=0), A0.norm(dim=1))  # S split as its square root between the factors
    # randomized (q = r, as PEFT's): close where the spectrum decays, as a trained weight's does
    U, _, Vh = torch.linalg.svd(W, full_matrices=False)
    decaying = U @ torch.diag(0.1 ** torch.arange(12, dtype=torch.float64)) @ Vh
    A0, B0 = functional.pissa_pair(decaying, 3, scale=2.0)
    A1, B1 = functional.pissa_pair(decaying, 3, scale=2.0, niter=4)
    torch.testing.assert_close(B1 @ A1, B0 @ A0, atol=1e-6, rtol=0)


def test_olora_pair_is_the_first_r_of_the_qr():
    W = torch.randn(12, 20, dtype=torch.float64)
    A0, B0 = functional.olora_pair(W, 4)
    Q, R = torch.linalg.qr(W)
    torch.testing.assert_close(B0 @ A0, Q[:, :4] @ R[:4])
    torch.testing.assert_close(B0.t() @ B0, torch.eye(4, dtype=torch.float64))


# ---- every layer kind: function kept at init, the original weights back to the bit ----------------------

def _conv(geom):
    cin, cout, k, stride, padding, dilation, groups, mode, bias = geom
    return nn.Conv2d(cin, cout, k, stride, padding, dilation, groups, bias, mode)


@pytest.mark.parametrize("geom", GEOMETRIES)
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_every_conv_geometry(geom, init):
    torch.manual_seed(0)
    base = nn.Sequential(_conv(geom))
    x = torch.randn(2, geom[0], 9, 9)
    y0, orig = base(x), _state(base)
    fan_in = geom[0] // geom[6] * base[0].weight[0, 0].numel()
    rank = min(2, fan_in, geom[1])
    m = peftlite.wrap(copy.deepcopy(base), "0", rank=rank, init=init)
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)
    assert not torch.equal(m[0]._parameters["weight"], orig["0.weight"])  # the base holds the residual
    record = m[0].adapter_state.residual.records["weight"]
    assert record.nbytes <= max(64, orig["0.weight"].numel() * 4 / 8)  # the usual bound (a few words for tiny W)
    peftlite.unwrap(m, merge=False)
    assert _same(m, orig)


@pytest.mark.parametrize("init", INITS)
def test_linear_attention_direct_read_channels_last(init):
    class Reads(nn.Linear):  # a subclass whose own forward reads the weight
        def forward(self, x):
            return x @ self.weight.t() + self.bias

    torch.manual_seed(0)
    base = nn.ModuleDict({"fc": nn.Linear(16, 12), "mha": nn.MultiheadAttention(16, 2, batch_first=True),
                          "kv": nn.MultiheadAttention(16, 2, kdim=8, vdim=8, batch_first=True), "reads": Reads(16, 16),
                          "conv": nn.Conv2d(3, 6, 3).to(memory_format=torch.channels_last)})

    def run(m):
        x = torch.randn(2, 5, 16, generator=torch.Generator().manual_seed(1))
        kv = torch.randn(2, 4, 8, generator=torch.Generator().manual_seed(3))
        img = torch.randn(2, 3, 6, 6, generator=torch.Generator().manual_seed(2))
        return [m["fc"](x), m["mha"](x, x, x)[0], m["kv"](x, kv, kv)[0], m["reads"](x), m["conv"](img)]

    ys, orig = run(base), _state(base)
    m = peftlite.wrap(copy.deepcopy(base), ["fc", "mha", "kv", "reads", "conv"], rank=3, alpha=6, init=init)
    for y, y0 in zip(run(m), ys, strict=True):
        torch.testing.assert_close(y, y0, atol=1e-5, rtol=1e-5)
    assert set(m["kv"].adapter_state.residual.scales) == {"q_proj_weight", "k_proj_weight", "v_proj_weight"}
    _perturb(m)
    trained, before = run(m), _state(m)
    peftlite.merge(m)
    for y, yt in zip(run(m), trained, strict=True):
        torch.testing.assert_close(y, yt, atol=1e-5, rtol=1e-5)
    peftlite.unmerge(m)
    assert _same(m, before)  # merge and unmerge on top of the residual: exact
    peftlite.restore_base(m)  # the original weights, and the adapter as a rank-2r LoRA on them
    for name in ("fc.weight", "mha.in_proj_weight", "kv.k_proj_weight", "reads.weight", "conv.weight"):
        assert bits_equal(m.state_dict()[name], orig[name])
    assert m["fc"].lora.default.rank == 6 and m["fc"].lora.default.scale == pytest.approx(2.0)
    for y, yt in zip(run(m), trained, strict=True):
        torch.testing.assert_close(y, yt, atol=1e-5, rtol=1e-5)
    assert "fc.lora.default.A0" not in m.state_dict()
    peftlite.unwrap(m, merge=False)
    assert _same(m, orig)


def test_delete_gives_back_the_original_weights():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8), nn.Linear(8, 4))
    orig = _state(base)
    m = peftlite.wrap(copy.deepcopy(base), ["0", "1"], rank=2, init="pissa")
    peftlite.wrap(m, ["0"], rank=2, name="other")
    peftlite.delete(m, "default")
    assert bits_equal(m[0]._parameters["weight"], orig["0.weight"]) and type(m[1]) is nn.Linear
    assert bits_equal(m[1].weight, orig["1.weight"])


def test_training_reaches_the_adapter_only():
    torch.manual_seed(0)
    m = peftlite.wrap(nn.Sequential(nn.Linear(8, 8)), "0", rank=2, init="olora")
    m(torch.randn(4, 8)).square().sum().backward()
    pair = m[0].lora.default
    assert pair.A.grad is not None and pair.B.grad is not None
    assert not pair.A0.requires_grad and m[0]._parameters["weight"].grad is None


# ---- the residual base in the rest of the API ------------------------------------------------------

def _two_adapters():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 6))
    m = peftlite.wrap(copy.deepcopy(base), ["0", "2"], rank=3, init="pissa")
    peftlite.wrap(m, ["0", "2"], rank=2, name="other")
    _perturb(m)  # the active "default" trains
    with torch.no_grad():
        for layer in (m[0], m[2]):
            layer.lora.other.B.normal_(0, 0.05)
    return base, m


def test_original_model_whenever_the_principal_adapter_is_not_active():
    base, m = _two_adapters()
    x = torch.randn(5, 10)
    y0 = base(x)
    peftlite.use(m, "default")
    y_pissa = m(x)
    with peftlite.disabled(m):
        torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)
    peftlite.use(m, None)
    torch.testing.assert_close(m(x), y0, atol=1e-5, rtol=1e-5)
    # another adapter alone: the original weights plus it, as on an unmodified base
    peftlite.use(m, "other")
    ref = copy.deepcopy(base)
    for i in (0, 2):
        p = m[i].lora.other
        ref[i].weight.data += p.scale * p.B.detach() @ p.A.detach()
    torch.testing.assert_close(m(x), ref(x), atol=1e-5, rtol=1e-5)
    # weighted: w·PiSSA + (1 - w)·original, linear in w on each layer
    peftlite.use(m, {"default": 0.5})
    p = m[0].lora.default
    w = m[0]._parameters["weight"] + p.scale * 0.5 * (p.B @ p.A + p.B0 @ p.A0)
    torch.testing.assert_close(m[0](x), nn.functional.linear(x, w, m[0].bias), atol=1e-5, rtol=1e-5)
    # per_sample: rows without an adapter get the original model, rows of "default" the PiSSA one
    peftlite.use(m, "default")
    with peftlite.per_sample(m, [None, "default", "other", None, "default"]):
        y = m(x)
    torch.testing.assert_close(y[[0, 3]], y0[[0, 3]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[[1, 4]], y_pissa[[1, 4]], atol=1e-5, rtol=1e-5)
    torch.testing.assert_close(y[2], ref(x)[2], atol=1e-5, rtol=1e-5)


def test_merge_while_the_owner_is_inactive_is_exact_too():
    base, m = _two_adapters()
    x = torch.randn(5, 10)
    peftlite.use(m, "other")
    y, before = m(x), _state(m)
    peftlite.merge(m)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    with peftlite.disabled(m):  # unmerged inside, the original model
        torch.testing.assert_close(m(x), base(x), atol=1e-5, rtol=1e-5)
    peftlite.unmerge(m)
    assert _same(m, before)


def test_state_dict_keeps_the_way_back():
    torch.manual_seed(0)
    base, other = nn.Sequential(nn.Linear(10, 8)), nn.Sequential(nn.Linear(10, 8))
    orig, x = _state(base), torch.randn(3, 10)
    m = peftlite.wrap(copy.deepcopy(base), "0", rank=2, init="pissa")
    _perturb(m)
    sd = m.state_dict()
    assert {"0.lora.default.A0", "0.lora.default.B0"} <= set(sd)  # the residual's factors travel
    assert not torch.equal(sd["0.weight"], orig["0.weight"])  # the weight key holds the residual
    # a checkpoint of this run, loaded into the same base wrapped again: the way back stays bit-exact
    fresh = peftlite.wrap(copy.deepcopy(base), "0", rank=2, init="pissa")
    fresh.load_state_dict(sd)
    torch.testing.assert_close(fresh(x), m(x))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftlite.unwrap(fresh, merge=False)
    assert _same(fresh, orig)
    # loaded into another model: its record does not describe these bits, so W is recomputed (and says so)
    elsewhere = peftlite.wrap(copy.deepcopy(other), "0", rank=2, init="pissa")
    elsewhere.load_state_dict(sd)
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        peftlite.unwrap(elsewhere, merge=False)
    assert any("last bit" in str(w.message) for w in caught)
    torch.testing.assert_close(elsewhere[0].weight, orig["0.weight"], atol=1e-6, rtol=0)


def test_unwrap_merge_gives_the_trained_model():
    torch.manual_seed(0)
    m = peftlite.wrap(nn.Sequential(nn.Linear(10, 8)), "0", rank=2, init="olora")
    _perturb(m)
    x = torch.randn(3, 10)
    y = m(x)
    peftlite.unwrap(m)
    assert type(m[0]) is nn.Linear
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


# ---- bad input: a clear error, the model untouched ---------------------------------------------------

def _model():
    torch.manual_seed(0)
    return nn.Sequential(nn.Linear(16, 16), nn.Linear(16, 3))


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 4}, r"1: rank 4 is above min\(out, fan_in\) = min\(3, 16\)"),  # all or nothing: layer 0 fits
    ({"init": "gaussian"}, "init must be one of"),
    ({"init": "pissa_niter_0"}, "init must be one of"),
    ({"init": "pissa", "variant": "dora"}, "plain LoRA only"),
    ({"init": "olora", "kind": "loha"}, "plain LoRA only"),
])
def test_refused_and_untouched(kwargs, match):
    m = _model()
    snap = snapshot(m)
    with pytest.raises(ValueError, match=match):
        peftlite.wrap(m, ["0", "1"], **{"init": "pissa", **kwargs})
    assert_unchanged(m, snap)


def test_non_finite_and_meta_and_tied_refused():
    m = _model()
    with torch.no_grad():
        m[1].weight[0, 0] = float("nan")
    snap = snapshot(m)
    with pytest.raises(ValueError, match="1: its weight holds 1 non-finite"):
        peftlite.wrap(m, ["0", "1"], rank=2, init="pissa")
    assert_unchanged(m, snap)
    with torch.device("meta"):
        meta = _model()
    with pytest.raises(ValueError, match="meta device .* nothing to decompose"):
        peftlite.wrap(meta, "0", rank=2, init="olora")
    tied = _model()
    tied.add_module("emb", nn.Embedding(16, 16))
    tied.emb.weight = tied[0].weight
    with pytest.raises(ValueError, match="shared with emb.weight"):
        peftlite.wrap(tied, "0", rank=2, init="pissa")


def test_second_principal_init_refused_and_files_into_it():
    m = peftlite.wrap(_model(), ["0", "1"], rank=2, init="pissa")
    snap = snapshot(m)
    with pytest.raises(ValueError, match="0's base already holds the residual of adapter 'default'"):
        peftlite.wrap(m, "0", rank=2, init="olora", name="second")
    assert_unchanged(m, snap)
    peftlite.wrap(m, "0", rank=2, name="plain")  # a default init on top is fine
    with pytest.raises(ValueError, match="started from a pissa init"):
        peftlite.combine(m, {"default": 1.0, "plain": 1.0}, name="mix", how="cat")


def test_a_lokr_adapter_on_a_residual_base_merges_with_the_residual():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(16, 16))
    x = torch.randn(3, 16)
    m = peftlite.wrap(copy.deepcopy(base), "0", rank=2, init="pissa")
    peftlite.wrap(m, "0", rank=2, kind="lokr", name="kr")
    with torch.no_grad():
        m[0].lora.kr.W1.normal_(0, 0.1)
    y, before = m(x), _state(m)
    peftlite.merge(m)
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)
    peftlite.unmerge(m)
    assert _same(m, before)


def test_dora_on_a_residual_base_refused_and_hotswap_padding_kept():
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(8, 8))
    m = peftlite.wrap(copy.deepcopy(base), "0", rank=2, init="pissa")
    snap = snapshot(m)
    with pytest.raises(ValueError, match="DoRA magnitude cannot rescale"):
        peftlite.wrap(m, "0", rank=2, variant="dora", name="d")
    assert_unchanged(m, snap)
    d = peftlite.wrap(copy.deepcopy(base), "0", rank=2, variant="dora", name="d")
    with pytest.raises(ValueError, match="has the DoRA adapter 'd'"):
        peftlite.wrap(d, "0", rank=2, init="olora")
    _perturb(m)
    x = torch.randn(3, 8)
    peftlite.prepare_hotswap(m, max_rank=4)  # pads A and B to rank 4
    y = m(x)
    peftlite.restore_base(m)
    assert bits_equal(m[0]._parameters["weight"], base[0].weight)
    assert m[0].lora.default.rank == m[0].lora.default.A.shape[0] == 6
    torch.testing.assert_close(m(x), y, atol=1e-5, rtol=1e-5)


def test_per_sample_through_attention_read_directly():
    torch.manual_seed(0)
    base = nn.ModuleDict({"fc": nn.Linear(16, 16), "mha": nn.MultiheadAttention(16, 2, batch_first=True)})
    x = torch.randn(3, 4, 16)
    m = peftlite.wrap(copy.deepcopy(base), ["mha"], rank=2, init="olora")
    peftlite.wrap(m, ["fc"], rank=2, name="f")
    with peftlite.per_sample(m, [None, "f", None]):  # attention is not routed: every row on the original weights
        y = m["mha"](x, x, x)[0]
    torch.testing.assert_close(y, base["mha"](x, x, x)[0], atol=1e-5, rtol=1e-5)
