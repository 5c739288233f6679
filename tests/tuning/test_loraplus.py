"""LoRA+ (param_groups and Unfreezer ``loraplus_ratio``): B's LR is the ratio times its own A's, per pair.

Pairs are found here independently of peftlite's protocol walk, from parameter names: every
``...lora.<adapter>[.<slot>].A`` with the ``B`` beside it.
"""

from __future__ import annotations

import inspect
import math

import pytest
import torch
import torchvision
from torch import nn

import peftlite
from conftest import group_of_param
from peftlite.layers import adapted_layers

RATIO = 16.0


def _pairs(model):
    """Independent reference: (A name, B name) for every adapter pair, from the parameter names."""
    names = [n for n, _ in model.named_parameters()]
    pairs = [(n, n[:-1] + "B") for n in names if ".lora." in f".{n}" and n.endswith(".A")]
    assert pairs and all(b in names for _, b in pairs)
    return pairs


def _wrapped():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    return peftlite.wrap(model, ["layer3.*", "layer4.*"], rank=2, heads={"fc": nn.Linear(512, 4)})


@pytest.fixture(scope="module")
def resnet():
    return _wrapped()


def _trainable(model):
    return {id(p) for p in model.parameters() if p.requires_grad}


def test_b_gets_ratio_times_its_a_with_lrs_and_everything_else_is_unchanged(resnet):
    lrs = {"layer4.1": 1e-4, "layer3": 2e-4}
    groups = peftlite.param_groups(resnet, 1e-3, lrs=lrs, weight_decay=0.05, loraplus_ratio=RATIO)
    plain = group_of_param(peftlite.param_groups(resnet, 1e-3, lrs=lrs, weight_decay=0.05))
    of = group_of_param(groups)
    params = dict(resnet.named_parameters())
    assert set(of) == _trainable(resnet)  # every trainable parameter, exactly once
    pairs = _pairs(resnet)
    for a, b in pairs:
        want = 1e-4 if a.startswith("layer4.1.") else 2e-4 if a.startswith("layer3.") else 1e-3
        assert of[id(params[a])]["lr"] == want, a
        assert of[id(params[b])]["lr"] == pytest.approx(RATIO * want, rel=1e-12), b
    bs = {b for _, b in pairs}
    for name, p in params.items():
        if id(p) not in of:
            continue
        g, ref = of[id(p)], plain[id(p)]
        assert g["weight_decay"] == ref["weight_decay"], name  # weight decay is as without LoRA+
        if name in bs:
            assert g["name"] == ref["name"] + "/loraplus" and g["params"] != ref["params"], name
        else:
            assert (g["lr"], g["name"]) == (ref["lr"], ref["name"]), name
    assert of[id(resnet.fc.weight)]["lr"] == of[id(resnet.fc.bias)]["lr"] == 1e-3  # heads keep their LR
    torch.optim.AdamW(groups)


@pytest.mark.parametrize("ratio", [RATIO, 2.5, 0.5])
def test_ratio_applies_after_layer_decay_and_lrs_per_pair(resnet, ratio):
    groups = peftlite.param_groups(resnet, 1.0, lrs={"layer4.0": 0.1}, layer_decay=0.5, loraplus_ratio=ratio)
    of = group_of_param(groups)
    found = peftlite.blocks(resnet)
    block_of = {n: i for i, b in enumerate(found) for n in b.params}
    params = dict(resnet.named_parameters())
    for a, b in _pairs(resnet):
        assert block_of[a] == block_of[b]
        base = (0.1 if a.startswith("layer4.0.") else 1.0) * 0.5 ** (len(found) - 1 - block_of[a])
        assert of[id(params[a])]["lr"] == pytest.approx(base, rel=1e-12), a
        assert of[id(params[b])]["lr"] == pytest.approx(ratio * base, rel=1e-12), b
        assert of[id(params[b])]["name"].split("/")[0] == found[block_of[a]].name
    assert set(of) == _trainable(resnet)


def test_no_decay_patterns_reach_b_groups():
    model = _wrapped()
    groups = peftlite.param_groups(model, 1e-3, weight_decay=0.1, no_decay=("*.B",), loraplus_ratio=RATIO)
    of = group_of_param(groups)
    params = dict(model.named_parameters())
    for a, b in _pairs(model):
        assert (of[id(params[a])]["weight_decay"], of[id(params[a])]["name"]) == (0.1, "decay")
        assert (of[id(params[b])]["weight_decay"], of[id(params[b])]["name"]) == (0.0, "no_decay/loraplus")


class Mixed(nn.Module):
    """A Linear, and attention with separate q/k/v weights (three slots per adapter)."""

    def __init__(self):
        super().__init__()
        self.proj = nn.Linear(6, 8)
        self.attn = nn.MultiheadAttention(8, 2, kdim=6, vdim=6)


def test_pairs_follow_adapter_name_and_slot():
    torch.manual_seed(0)
    model = peftlite.wrap(Mixed(), ["proj", "attn"], rank=2)
    peftlite.wrap(model, ["proj", "attn"], rank=3, name="other")
    peftlite.use(model, ["default", "other"])  # both train
    lrs = {"*.lora.other.*": 1e-2, "attn.lora.default.k_proj_weight.*": 1e-4}
    of = group_of_param(peftlite.param_groups(model, 1e-3, lrs=lrs, loraplus_ratio=RATIO))
    params = dict(model.named_parameters())
    pairs = _pairs(model)
    assert len(pairs) == 2 * (1 + 1 + 3)  # per adapter: proj, out_proj, q/k/v
    for a, b in pairs:
        want = 1e-2 if ".lora.other." in a else 1e-4 if ".k_proj_weight." in a else 1e-3
        assert of[id(params[a])]["lr"] == want, a
        assert of[id(params[b])]["lr"] == pytest.approx(RATIO * want, rel=1e-12), b
    assert set(of) == _trainable(model)


def _add_magnitudes(model):
    """Simulate DoRA: a magnitude ``(out,)`` on every pair, starting at ‖W‖ row norms (here ones)."""
    for _, layer in adapted_layers(model):
        for slots in layer.adapters().values():
            for pair in slots.values():
                pair.magnitude = nn.Parameter(torch.ones(pair.B.shape[0]))
    return model


def test_magnitudes_keep_their_a_lr_and_head_biases_their_own():
    model = _add_magnitudes(_wrapped())
    groups = peftlite.param_groups(model, 1.0, lrs={"layer4.1": 0.1}, layer_decay=0.5, weight_decay=0.05,
                                   loraplus_ratio=RATIO)
    of = group_of_param(groups)
    assert set(of) == _trainable(model)
    params = dict(model.named_parameters())
    for a, b in _pairs(model):
        mag = a[:-1] + "magnitude"
        assert params[mag].requires_grad
        g = of[id(params[mag])]
        assert g["lr"] == of[id(params[a])]["lr"] and g["lr"] * RATIO == pytest.approx(of[id(params[b])]["lr"])
        assert g["weight_decay"] == 0.0 and not g["name"].endswith("/loraplus")  # 1-D: no decay, no ratio
    assert of[id(model.fc.bias)]["lr"] == 1.0 and of[id(model.fc.bias)]["weight_decay"] == 0.0


def test_real_dora_magnitudes_go_with_a():
    if "variant" not in inspect.signature(peftlite.wrap).parameters:
        pytest.skip("wrap has no variant= (DoRA) yet")
    torch.manual_seed(0)
    model = peftlite.wrap(Mixed(), ["proj"], rank=2, variant="dora")
    of = group_of_param(peftlite.param_groups(model, 1e-3, weight_decay=0.1, loraplus_ratio=RATIO))
    lora = model.proj.lora.default
    assert of[id(lora.magnitude)]["lr"] == of[id(lora.A)]["lr"] == 1e-3
    assert of[id(lora.B)]["lr"] == pytest.approx(RATIO * 1e-3) and of[id(lora.magnitude)]["weight_decay"] == 0.0
    assert set(of) == _trainable(model)


@pytest.mark.parametrize("dora", [False, True])
def test_same_a_and_b_lrs_as_peft_create_loraplus_optimizer(dora):
    pytest.importorskip("peft")
    pytest.importorskip("transformers")
    from peft import LoraConfig, get_peft_model
    from peft.optimizers import create_loraplus_optimizer

    def mlp():
        torch.manual_seed(0)
        return nn.Sequential(nn.Linear(8, 16), nn.ReLU(), nn.Linear(16, 16), nn.ReLU(), nn.Linear(16, 3))

    theirs = get_peft_model(mlp(), LoraConfig(r=2, target_modules=["0", "2"], use_dora=dora))
    opt = create_loraplus_optimizer(theirs, torch.optim.AdamW, lr=1e-3, loraplus_lr_ratio=RATIO,
                                    loraplus_weight_decay=0.01)
    peft_of = {n.removeprefix("base_model.model."): g for g in opt.param_groups
               for n, p in theirs.named_parameters() if any(p is q for q in g["params"])}
    ours = peftlite.wrap(mlp(), ["0", "2"], rank=2)
    if dora:
        _add_magnitudes(ours)
    of = group_of_param(peftlite.param_groups(ours, 1e-3, weight_decay=0.01, loraplus_ratio=RATIO))
    params = dict(ours.named_parameters())
    for layer in ("0", "2"):
        for mine, peft_name in (("A", "lora_A"), ("B", "lora_B")):
            g, ref = of[id(params[f"{layer}.lora.default.{mine}"])], peft_of[f"{layer}.{peft_name}.default.weight"]
            assert g["lr"] == pytest.approx(ref["lr"], rel=1e-12) and g["weight_decay"] == ref["weight_decay"]
        if dora:  # the documented difference: PEFT gives magnitudes B's LR, peftlite A's
            mag = peft_of[f"{layer}.lora_magnitude_vector.default.weight"]
            assert mag["lr"] == pytest.approx(RATIO * 1e-3)
            assert of[id(params[f"{layer}.lora.default.magnitude"])]["lr"] == 1e-3


def test_unfreezer_adds_loraplus_groups():
    model = _wrapped()
    peftlite.freeze(model, "layer3.*.lora.*")  # added by the Unfreezer, trained from epoch 1
    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2, loraplus_ratio=RATIO))
    before = [(g["name"], g["lr"], len(g["params"])) for g in opt.param_groups]
    expected = _trainable(model) | {id(p) for n, p in model.named_parameters() if n.startswith("layer3.")
                                    and ".lora." in n}
    unfreezer = peftlite.Unfreezer(model, opt, {1: ["layer3.*.lora.*"]}, lr=1e-3, layer_decay=0.5, loraplus_ratio=4)
    assert [(g["name"], g["lr"], len(g["params"])) for g in opt.param_groups[:len(before)]] == before
    of = group_of_param(opt.param_groups)
    params = dict(model.named_parameters())
    assert set(of) == expected  # each parameter exactly once
    found = peftlite.blocks(model)
    block_of = {n: i for i, b in enumerate(found) for n in b.params}
    for a, b in _pairs(model):
        ga, gb = of[id(params[a])], of[id(params[b])]
        if a.startswith("layer3."):
            assert ga["lr"] == pytest.approx(1e-3 * 0.5 ** (len(found) - 1 - block_of[a]), rel=1e-12)
            assert gb["lr"] == pytest.approx(4 * ga["lr"], rel=1e-12)
            assert gb["name"].startswith("unfreeze@1/") and gb["name"].endswith("/loraplus")
            assert gb["name"] in unfreezer.added
        else:  # from param_groups, unchanged
            assert (ga["lr"], gb["lr"]) == (1e-2, pytest.approx(RATIO * 1e-2))
    assert unfreezer.step(1)


def test_unfreezer_refuses_a_ratio_that_does_nothing_or_a_split_pair():
    model = _wrapped()
    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))
    with pytest.raises(ValueError, match=r"loraplus_ratio=16.0 applies to the adapter B .* adds none"):
        peftlite.Unfreezer(model, opt, {1: ["layer1"]}, loraplus_ratio=RATIO)
    peftlite.freeze(model, "*.B")
    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))
    n_groups = len(opt.param_groups)
    with pytest.raises(ValueError, match=r"adds 'layer3\.0\.conv1\.lora\.default\.B' but its A .* is already"):
        peftlite.Unfreezer(model, opt, {1: ["*.B"]}, loraplus_ratio=RATIO)
    assert len(opt.param_groups) == n_groups and not model.layer3[0].conv1.lora.default.B.requires_grad
    with pytest.raises(ValueError, match="Unfreezer: loraplus_ratio must be a positive finite number, got 0"):
        peftlite.Unfreezer(model, opt, {1: ["*.B"]}, loraplus_ratio=0)


@pytest.mark.parametrize("ratio", [0, -4, math.nan, math.inf, True, "16", [16]])
def test_bad_ratio_names_the_value_and_the_fix(resnet, ratio):
    with pytest.raises(ValueError, match=rf"loraplus_ratio must be a positive finite number, got "
                                         rf"{repr(ratio).replace('[', '.').replace(']', '.')}; .*loraplus_ratio=16"):
        peftlite.param_groups(resnet, 1e-3, loraplus_ratio=ratio)


def test_ratio_without_a_training_b_is_an_error():
    with pytest.raises(ValueError, match=r"loraplus_ratio=16.0 .* no adapter B trains .*peftlite\.wrap"):
        peftlite.param_groups(torchvision.models.resnet18(num_classes=3), 1e-3, loraplus_ratio=RATIO)
    model = _wrapped()
    peftlite.freeze(model, "*.lora.*")  # the head still trains
    with pytest.raises(ValueError, match="no adapter B trains"):
        peftlite.param_groups(model, 1e-3, loraplus_ratio=RATIO)


def test_b_only_training_follows_the_frozen_a():
    model = _wrapped()
    peftlite.freeze(model, "*.A")  # LoRA-FA style: A fixed, B trains
    of = group_of_param(peftlite.param_groups(model, 1.0, layer_decay=0.5, loraplus_ratio=RATIO))
    found = peftlite.blocks(model)
    block_of = {n: i for i, b in enumerate(found) for n in b.params}
    params = dict(model.named_parameters())
    for a, b in _pairs(model):
        assert id(params[a]) not in of
        assert of[id(params[b])]["lr"] == pytest.approx(RATIO * 0.5 ** (len(found) - 1 - block_of[a]), rel=1e-12)


def test_lrs_that_split_a_pair_are_an_error(resnet):
    with pytest.raises(ValueError, match=r"'layer3\.0\.conv1\.lora\.default\.B' gets 0\.001 \(pattern None\) "
                                         r"and its A 'layer3\.0\.conv1\.lora\.default\.A' gets 0\.0001 "
                                         r"\(pattern '\*\.A'\)"):
        peftlite.param_groups(resnet, 1e-3, lrs={"*.A": 1e-4}, loraplus_ratio=RATIO)
    peftlite.param_groups(resnet, 1e-3, lrs={"*.A": 1e-4})  # without LoRA+ the split is the user's choice
