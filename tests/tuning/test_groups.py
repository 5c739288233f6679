"""param_groups and blocks: exact membership, LRs and weight decay on torchvision ResNet-18 and ViT-B/16."""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

import peftlite
from conftest import group_of_param


@pytest.fixture(scope="module")
def resnet():
    return torchvision.models.resnet18(num_classes=3)


@pytest.fixture(scope="module")
def vit():
    return torchvision.models.vit_b_16(num_classes=3)


def _resnet_block(name: str) -> int:
    """Independent reference: stem 0, layer{L}.{b} -> 1 + 2(L-1) + b, fc 9."""
    m = re.match(r"layer(\d)\.(\d)\.", name)
    if m:
        return 1 + 2 * (int(m[1]) - 1) + int(m[2])
    return 9 if name.startswith("fc.") else 0


def _vit_block(name: str) -> int:
    """Independent reference: stem 0, encoder_layer_i -> 1 + i, encoder.ln 13, heads 14."""
    m = re.match(r"encoder\.layers\.encoder_layer_(\d+)\.", name)
    if m:
        return 1 + int(m[1])
    if name.startswith("encoder.ln."):
        return 13
    return 14 if name.startswith("heads.") else 0


# torchvision's norm names (resnet bn1, downsample.1; ViT ln_1, ln_2, encoder.ln) and every bias
_NORM_OR_BIAS = re.compile(r"(\.bn\d|^bn1|downsample\.1|\bln(_\d)?)\.(weight|bias)$|\.bias$|_bias$")


@pytest.mark.parametrize("which, block_of, n_blocks",
                         [("resnet", _resnet_block, 10), ("vit", _vit_block, 15)])
def test_layer_decay_lrs_and_no_decay_are_exact(which, block_of, n_blocks, request):
    model = request.getfixturevalue(which)
    found = peftlite.blocks(model)
    assert len(found) == n_blocks
    for i, b in enumerate(found):
        assert all(block_of(n) == i for n in b.params), b.name
    groups = peftlite.param_groups(model, 1.0, layer_decay=0.5, weight_decay=0.05)
    of = group_of_param(groups)
    params = dict(model.named_parameters())
    assert set(of) == {id(p) for p in params.values()}  # every trainable parameter, exactly once
    for name, p in params.items():
        g = of[id(p)]
        assert g["lr"] == 0.5 ** (n_blocks - 1 - block_of(name)), name
        assert g["weight_decay"] == (0.0 if _NORM_OR_BIAS.search(name) else 0.05), name
        assert g["name"].split("/")[0] == found[block_of(name)].name
    torch.optim.AdamW(groups)  # torch accepts them (no duplicates, all keys valid)


def test_resnet_blocks_are_named_as_torchvision_names_them(resnet, vit):
    assert [b.name for b in peftlite.blocks(resnet)] == [
        "stem", "layer1.0", "layer1.1", "layer2.0", "layer2.1", "layer3.0", "layer3.1", "layer4.0",
        "layer4.1", "head"]
    names = [b.name for b in peftlite.blocks(vit)]
    assert names[3] == "encoder.layers.encoder_layer_2" and names[-2:] == ["encoder.ln", "heads.head"]
    assert peftlite.blocks(vit)[0].params == ("class_token", "conv_proj.weight", "conv_proj.bias",
                                                "encoder.pos_embedding")


def test_only_trainable_params_with_first_matching_lr():
    model = torchvision.models.resnet18(num_classes=3)
    peftlite.freeze(model)
    peftlite.unfreeze(model, "layer4", "fc")
    groups = peftlite.param_groups(model, 1e-3, lrs={"layer4.1.*": 1e-5, "layer4": 1e-4, "fc": 1e-2})
    of = group_of_param(groups)
    params = dict(model.named_parameters())
    trainable = {id(p) for n, p in params.items() if n.startswith(("layer4.", "fc."))}
    assert set(of) == trainable
    for name, p in params.items():
        if id(p) in of:
            want = 1e-5 if name.startswith("layer4.1.") else 1e-4 if name.startswith("layer4.") else 1e-2
            assert of[id(p)]["lr"] == want, name
    assert {g["name"] for g in groups} == {f"lrs[{p}]/{d}" for p in ("layer4.1.*", "layer4", "fc")
                                           for d in ("decay", "no_decay")}


def test_lrs_compose_with_layer_decay():
    model = torchvision.models.resnet18(num_classes=3)
    groups = peftlite.param_groups(model, 1.0, lrs={"layer4.0": 0.1}, layer_decay=0.5)
    of = group_of_param(groups)
    assert of[id(model.layer4[0].conv1.weight)]["lr"] == pytest.approx(0.1 * 0.5 ** 2)
    assert of[id(model.layer4[1].conv1.weight)]["lr"] == pytest.approx(0.5)
    assert of[id(model.fc.weight)]["lr"] == 1.0


def test_no_decay_by_type_and_by_glob():
    class Net(nn.Module):  # norm weights that are not 1-D, and names that say nothing
        def __init__(self):
            super().__init__()
            self.a = nn.Linear(4, 4)
            self.b = nn.GroupNorm(2, 4)
            self.token = nn.Parameter(torch.zeros(1, 2, 4))
            self.c = nn.Linear(4, 2, bias=False)

    net = Net()
    net.b.weight = nn.Parameter(torch.ones(4, 1))  # 2-D, still a norm's: no decay by type
    of = group_of_param(peftlite.param_groups(net, 1.0, weight_decay=0.1, no_decay=("tok*",)))
    wd = {n: of[id(p)]["weight_decay"] for n, p in net.named_parameters()}
    assert wd == {"token": 0.0, "a.weight": 0.1, "a.bias": 0.0, "b.weight": 0.0, "b.bias": 0.0,
                  "c.weight": 0.1}


def test_wrapped_model_adapters_join_their_layers_block(resnet):
    model = peftlite.wrap(torchvision.models.resnet18(num_classes=3), "layer3.*", rank=2,
                          heads={"fc": nn.Linear(512, 4)})
    found = {n: b.name for b in peftlite.blocks(model) for n in b.params}
    assert found["layer3.1.conv2.lora.default.A"] == "layer3.1" and found["fc.weight"] == "head"
    groups = peftlite.param_groups(model, 1.0, layer_decay=0.5)
    of = group_of_param(groups)
    assert of[id(model.layer3[1].conv2.lora.default.B)]["lr"] == 0.5 ** 3
    assert len(of) == sum(p.requires_grad for p in model.parameters())


def test_summary_lists_the_blocks(resnet):
    text = str(peftlite.summary(resnet, blocks=True))
    assert "blocks for layer_decay, input -> output (10):" in text
    assert re.search(r"\n\s+8\s+layer4\.1\s+\(4,720,640 parameters", text)
    assert peftlite.summary(resnet).notes == []


def test_timm_group_matcher_defines_the_blocks():
    timm = pytest.importorskip("timm")
    model = timm.create_model("vit_tiny_patch16_224", pretrained=False, num_classes=3, depth=3)
    found = peftlite.blocks(model)
    block_of = {n: i for i, b in enumerate(found) for n in b.params}
    assert block_of["cls_token"] == block_of["pos_embed"] == block_of["patch_embed.proj.weight"] == 0
    assert block_of["blocks.1.attn.qkv.weight"] == 2
    # timm keeps the final norm with the last block
    assert block_of["norm.weight"] == block_of["blocks.2.mlp.fc2.bias"] == 3
    assert block_of["head.weight"] == 4 == len(found) - 1
    assert [b.name for b in found] == ["cls_token+pos_embed+patch_embed", "blocks.0", "blocks.1",
                                       "blocks.2+norm", "head"]
    of = group_of_param(peftlite.param_groups(model, 1.0, weight_decay=0.1))
    assert of[id(model.pos_embed)]["weight_decay"] == 0.0  # timm's model.no_weight_decay()


@pytest.mark.parametrize("kwargs, error, text", [
    ({"lrs": {"layer9": 1e-3}}, ValueError,
     r"param_groups lrs: 'layer9' names no module or tensor .*would match: 'layer\d' "),
    ({"layer_decay": 1.5}, ValueError, "layer_decay=1.5 would raise LRs"),
    ({"layer_decay": 0}, ValueError, "layer_decay must be a positive finite number, got 0"),
    ({"weight_decay": -1}, ValueError, "weight_decay must be a number >= 0, got -1"),
    ({"lrs": {"fc": -1}}, ValueError, r"lrs\['fc'\] must be a positive"),
    ({"lrs": ["fc"]}, TypeError, "lrs must be a dict"),
])
def test_errors_name_the_bad_value(resnet, kwargs, error, text):
    with pytest.raises(error, match=text):
        peftlite.param_groups(resnet, 1e-3, **kwargs)


def test_no_trainable_params_is_an_error():
    model = nn.Linear(2, 2)
    peftlite.freeze(model)
    with pytest.raises(ValueError, match="no trainable parameter"):
        peftlite.param_groups(model, 1e-3)
