"""Target resolution, and every wrap error path: the message names the value and the fix; nothing changes."""

import re

import pytest
import torch
import torchvision
from torch import nn

import peftlite
from conftest import assert_unchanged, snapshot
from peftlite.layers import AdaptedLayer


def resnet():
    torch.manual_seed(0)
    return torchvision.models.resnet18(num_classes=4)


def adapted_names(model):
    return [n for n, m in model.named_modules() if isinstance(m, AdaptedLayer)]


@pytest.mark.parametrize("targets, expected", [
    ("layer4.*", ["layer4.0.conv1", "layer4.0.conv2", "layer4.0.downsample.0", "layer4.1.conv1", "layer4.1.conv2"]),
    ("layer4.1", ["layer4.1.conv1", "layer4.1.conv2"]),  # a container selects what lies beneath
    (["conv1", "fc"], ["conv1", "fc"]),
    (re.compile(r"layer3\.\d\.conv2"), ["layer3.0.conv2", "layer3.1.conv2"]),
    (nn.Linear, ["fc"]),
    ((nn.Linear,), ["fc"]),
    (lambda name, m: isinstance(m, nn.Conv2d) and m.kernel_size == (1, 1),
     ["layer2.0.downsample.0", "layer3.0.downsample.0", "layer4.0.downsample.0"]),
    (["fc", re.compile(r"layer1\.0\.conv1"), nn.Linear], ["layer1.0.conv1", "fc"]),
])
def test_target_forms(targets, expected):
    model = peftlite.wrap(resnet(), targets, rank=2)
    assert adapted_names(model) == expected


def test_wildcard_skips_unsupported_modules():
    model = peftlite.wrap(resnet(), "layer1.0.*", rank=2)  # also matches bn1, relu
    assert adapted_names(model) == ["layer1.0.conv1", "layer1.0.conv2"]


@pytest.mark.parametrize("targets, match", [
    ("layer9.*", r"targets: 'layer9\.\*' selected no adaptable module .*would match: 'layer\d\.\*' \(5 "),
    (re.compile("nothing"), r"re.compile\('nothing'\) selected no adaptable module"),
    ([nn.Conv1d], r"Conv1d selected no adaptable module .*the model has: Conv2d \(20\), Linear \(1\)"),
    (["conv1", "layer4.1.relu"], None),
])
def test_empty_selection_is_a_value_error(targets, match):
    model = resnet()
    snap = snapshot(model)
    if match is None:  # an exact name of an unsupported leaf is a TypeError instead
        with pytest.raises(TypeError, match=r"'layer4\.1\.relu' is a ReLU.*supported types: nn\.MultiheadAttention"):
            peftlite.wrap(model, targets)
    else:
        with pytest.raises(ValueError, match=match):
            peftlite.wrap(model, targets)
    assert_unchanged(model, snap)


def test_patterns_that_would_match_are_listed():
    with pytest.raises(ValueError, match=r"'layer4\.0\.conv' names no module \(as a full name\)") as e:
        peftlite.wrap(resnet(), "layer4.0.conv")
    hints = str(e.value).split("patterns that would match: ")[1].split(", ")
    assert "'layer4.0.conv1' (1 adaptable modules)" in hints and len(hints) <= 5


def test_exact_unsupported_name_is_a_type_error():
    model = resnet()
    snap = snapshot(model)
    with pytest.raises(TypeError) as e:
        peftlite.wrap(model, "bn1")
    msg = str(e.value)
    assert "'bn1' is a BatchNorm2d" in msg and "nn.Conv2d" in msg and "nn.Linear" in msg
    assert_unchanged(model, snap)


@pytest.mark.parametrize("kwargs, match", [
    ({"rank": 0}, "rank must be a positive integer, got 0"),
    ({"rank": 2.5}, "rank must be a positive integer, got 2.5"),
    ({"rank": True}, "rank must be a positive integer, got True"),
    ({"alpha": -1.0}, "alpha must be a positive finite number .* got -1.0"),
    ({"alpha": float("nan")}, "alpha must be .* got nan"),
    ({"dropout": 1.0}, r"dropout must be a probability in \[0, 1\), got 1.0"),
    ({"dropout": -0.1}, "dropout must be .* got -0.1"),
])
def test_bad_hyperparameters(kwargs, match):
    model = resnet()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=match):
        peftlite.wrap(model, "layer4.*", **kwargs)
    assert_unchanged(model, snap)


def test_bad_heads_and_trainable():
    model = resnet()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"heads\['fcc'\]: 'fcc' names no module \(neither .*would match: 'fc' "):
        peftlite.wrap(model, "layer4.*", heads={"fcc": nn.Linear(512, 3)})
    with pytest.raises(TypeError, match=r"heads\['fc'\] must be an nn.Module"):
        peftlite.wrap(model, heads={"fc": "linear"})
    with pytest.raises(ValueError, match=r"trainable: 'layer5' names no module or tensor .*would match: 'layer\d'"):
        peftlite.wrap(model, "layer4.*", trainable=["layer5"])
    with pytest.raises(ValueError, match="nothing to train"):
        peftlite.wrap(model)
    with pytest.raises(TypeError, match="42 .int. is not a pattern; use a name or glob string"):
        peftlite.wrap(model, 42)
    assert_unchanged(model, snap)


def test_already_adapted_layer_is_refused():
    model = peftlite.wrap(resnet(), "layer4.0.conv1", rank=2)
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"'layer4\.0\.conv1' already has an adapter named 'default'; give the new "
                                         r"one another name="):
        peftlite.wrap(model, "layer4.0.*")
    assert_unchanged(model, snap)
    peftlite.wrap(model, "layer4.1.conv1", rank=4)  # other layers can be added
    assert adapted_names(model) == ["layer4.0.conv1", "layer4.1.conv1"]


def test_refuses_lazy_and_parametrized_modules():
    lazy = nn.Sequential(nn.LazyLinear(3))
    with pytest.raises(TypeError, match="no initialised parameter 'weight'"):
        peftlite.wrap(lazy, nn.Linear)
    par = nn.Sequential(nn.Linear(3, 3))
    torch.nn.utils.parametrizations.orthogonal(par[0])
    with pytest.raises(TypeError, match="parametrized"):
        peftlite.wrap(par, "0")


def test_freezing_after_wrap():
    model = peftlite.wrap(resnet(), "layer4.*", rank=2, heads={"fc": nn.Linear(512, 3)}, trainable=["layer3.1"])
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    for n, _ in model.named_parameters():
        want = ".lora." in n or n.startswith("fc.") or n.startswith("layer3.1.")
        assert (n in trainable) == want, n


def test_head_only_and_heads_replace_modules():
    model = resnet()
    old_fc = model.fc
    head = nn.Linear(512, 3)
    peftlite.wrap(model, heads={"fc": head})
    assert model.fc is head and model.fc is not old_fc
    assert not adapted_names(model)
    assert model(torch.randn(1, 3, 32, 32)).shape == (1, 3)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {"fc.weight", "fc.bias"}


def test_heads_are_not_adapted_even_when_targets_match():
    model = resnet()
    with pytest.raises(ValueError, match="selected no adaptable module .* outside the heads"):  # fc is a head
        peftlite.wrap(model, nn.Linear, heads={"fc": nn.Linear(512, 3)})
    peftlite.wrap(model, (nn.Linear, nn.Conv2d), heads={"fc": nn.Linear(512, 3)})
    assert "fc" not in adapted_names(model)
