"""combine: each way against the dense ΔW it must equal or approximate, and 'linear' against PEFT itself."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn

import peftlite
from conftest import assert_unchanged, snapshot
from peftlite.layers import adapted_layers
from test_switching import randomize


def model(rank_b=2):
    torch.manual_seed(0)
    m = nn.ModuleDict({"fc": nn.Linear(10, 12), "conv": nn.Conv2d(4, 6, 3, padding=1, groups=2), "mha":
                       nn.MultiheadAttention(8, 2, batch_first=True)})
    peftlite.wrap(m, ["fc", "conv", "mha"], rank=2, alpha=3.0, name="a")
    peftlite.wrap(m, ["fc", "conv"], rank=rank_b, alpha=1.0, name="b")
    return randomize(m)


def delta(layer, name, slot="weight"):
    p = layer.pairs(name)[slot]
    return p.scale * (p.B.detach().double() @ p.A.detach().double())


def weighted(layer, weights, slot="weight"):
    return sum(w * delta(layer, n, slot) for n, w in weights.items() if n in layer.lora)


@pytest.mark.parametrize("how", ["cat", "linear", "svd"])
def test_each_way_against_the_weighted_dense_delta(how):
    m = model()
    weights = {"a": 0.7, "b": -0.4}
    errors = peftlite.combine(m, weights, name="ab", how=how)
    assert peftlite.adapters(m) == ["a", "b", "ab"] and peftlite.switching.active(m) == {"b": 1.0}  # inactive
    for lname, layer in adapted_layers(m):
        for slot in layer.pairs("ab"):
            target, got = weighted(layer, weights, slot), delta(layer, "ab", slot)
            key = lname if len(layer.pairs("ab")) == 1 else f"{lname}.{slot}"
            rel = float((got - target).norm() / target.norm())
            assert errors[key] == pytest.approx(rel, rel=1e-5, abs=1e-7)
            if how == "cat":  # exactly the weighted sum
                torch.testing.assert_close(got, target, rtol=1e-6, atol=1e-6)
            if how == "svd" and lname == "mha":  # one input (rank 2) at rank 2: no truncation
                assert rel < 1e-6
    if how == "svd":  # fc: the weighted sum has rank 4; its best rank-2 approximation loses the two smallest
        s = torch.linalg.svdvals(weighted(m["fc"], weights))
        assert errors["fc"] == pytest.approx(float(s[2:].norm() / s.norm()), rel=1e-6)
        assert errors["fc"] > 0.05


def test_svd_rank_and_outputs_of_a_cat_combination():
    m = model()
    peftlite.combine(m, {"a": 1.0, "b": 1.0}, name="svd4", how="svd", rank=4)
    assert m["fc"].pairs("svd4")["weight"].rank == 4
    assert peftlite.combine(m, {"a": 1.0, "b": 1.0}, name="cat", how="cat")["fc"] < 1e-6
    x = torch.randn(3, 10)
    peftlite.use(m, {"a": 1.0, "b": 1.0})
    want = m["fc"](x)
    peftlite.use(m, "cat")
    torch.testing.assert_close(m["fc"](x), want, rtol=1e-5, atol=1e-5)
    peftlite.use(m, "svd4")  # rank 4 holds both rank-2 inputs exactly
    torch.testing.assert_close(m["fc"](x), want, rtol=1e-4, atol=1e-4)


def test_linear_equals_peft_add_weighted_adapter():
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    base = nn.Sequential(nn.Linear(10, 12), nn.ReLU(), nn.Linear(12, 5))
    theirs = peft.get_peft_model(copy.deepcopy(base), peft.LoraConfig(r=3, lora_alpha=6, target_modules=["0", "2"]),
                                 adapter_name="first")
    theirs.add_adapter("second", peft.LoraConfig(r=3, lora_alpha=2, target_modules=["0", "2"]))
    ours = peftlite.wrap(copy.deepcopy(base), ["0", "2"], rank=3, alpha=6.0, name="a")
    peftlite.wrap(ours, ["0", "2"], rank=3, alpha=2.0, name="b")
    g = torch.Generator().manual_seed(3)
    with torch.no_grad():
        for i in ("0", "2"):
            for n, their_name in (("a", "first"), ("b", "second")):
                A = torch.randn(3, ours[int(i)].in_features, generator=g)
                B = torch.randn(ours[int(i)].out_features, 3, generator=g)
                theirs.base_model.model[int(i)].lora_A[their_name].weight.copy_(A)
                theirs.base_model.model[int(i)].lora_B[their_name].weight.copy_(B)
                ours[int(i)].pairs(n)["weight"].A.copy_(A)
                ours[int(i)].pairs(n)["weight"].B.copy_(B)
    theirs.add_weighted_adapter(["first", "second"], [0.6, -1.5], "ab", combination_type="linear")
    peftlite.combine(ours, {"a": 0.6, "b": -1.5}, name="ab", how="linear")
    theirs.set_adapter("ab")
    peftlite.use(ours, "ab")
    x = torch.randn(4, 10)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    for i in (0, 2):
        layer = theirs.base_model.model[i]
        torch.testing.assert_close(ours[i].pairs("ab")["weight"].A, layer.lora_A["ab"].weight)
        torch.testing.assert_close(ours[i].pairs("ab")["weight"].B, layer.lora_B["ab"].weight)


def test_bad_input_changes_nothing():
    m = model(rank_b=3)
    snap = snapshot(m)
    with pytest.raises(KeyError, match="combine: no adapter named 'z'"):
        peftlite.combine(m, {"a": 1.0, "z": 1.0}, name="az")
    with pytest.raises(ValueError, match=r"how='linear' needs equal ranks, got \[2, 3\]; use how='cat' or 'svd'"):
        peftlite.combine(m, {"a": 1.0, "b": 1.0}, name="ab", how="linear")
    with pytest.raises(ValueError, match="already has an adapter named 'a'"):
        peftlite.combine(m, {"b": 1.0}, name="a", how="cat")
    with pytest.raises(ValueError, match="how must be one of 'linear', 'cat', 'svd', got 'ties'"):
        peftlite.combine(m, {"a": 1.0}, name="t", how="ties")
    with pytest.raises(ValueError, match="rank= applies to how='svd' only"):
        peftlite.combine(m, {"a": 1.0}, name="t", how="cat", rank=2)
    with pytest.raises(ValueError, match="weight inf for 'a' is not a finite number"):
        peftlite.combine(m, {"a": float("inf")}, name="t", how="cat")
    assert_unchanged(m, snap)
    assert peftlite.adapters(m) == ["a", "b"]
