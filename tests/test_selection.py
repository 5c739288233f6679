"""The one pattern language: the same pattern means the same thing for every argument that takes patterns.

The table in docs/guide.md ("Patterns") is checked here row by row, on every argument: wrap(targets=),
wrap(trainable=), wrap(heads=) keys, freeze/unfreeze, save(include=), param_groups(lrs=, no_decay=) and
the Unfreezer schedule.
"""

from __future__ import annotations

import re

import pytest
import torch
import torchvision
from torch import nn

import peftlite
from conftest import assert_unchanged, snapshot
from peftlite import selection
from peftlite.formats import native


class Block(nn.Module):
    def __init__(self):
        super().__init__()
        self.query, self.value = nn.Linear(8, 8), nn.Linear(8, 8)
        self.norm = nn.LayerNorm(8)

    def forward(self, x):
        return self.norm(x + self.query(x) + self.value(x))


class Net(nn.Module):
    """Names chosen for the table: a top-level ``value`` and deeper ``*.value``, ``*.query`` only deeper."""

    def __init__(self):
        super().__init__()
        self.blocks = nn.ModuleList([Block(), Block()])
        self.value = nn.Linear(8, 8)
        self.head = nn.Linear(8, 3)

    def forward(self, x):
        for b in self.blocks:
            x = b(x)
        return self.head(self.value(x))


def net():
    torch.manual_seed(0)
    return Net()


PARAMS = [n for n, _ in net().named_parameters()]

# pattern -> the parameters it selects (a parameter is selected by its own name or any module holding it)
TABLE = [
    ("blocks.0", [n for n in PARAMS if n.startswith("blocks.0.")]),
    ("blocks.*.query", ["blocks.0.query.weight", "blocks.0.query.bias", "blocks.1.query.weight",
                        "blocks.1.query.bias"]),
    ("query", ["blocks.0.query.weight", "blocks.0.query.bias", "blocks.1.query.weight", "blocks.1.query.bias"]),
    ("value", ["value.weight", "value.bias"]),  # a top-level module: that one only
    ("*.value", [n for n in PARAMS if ".value." in n and n.startswith("blocks")]),
    ("head.weight", ["head.weight"]),
    ("bias", [n for n in PARAMS if n.endswith(".bias")]),
    (re.compile(r"blocks\.1\.(query|value)"), [n for n in PARAMS if re.match(r"blocks\.1\.(query|value)\.", n)]),
    (nn.LayerNorm, [n for n in PARAMS if ".norm." in n]),
    (lambda name, m: name == "head", ["head.weight", "head.bias"]),
    (["head", "query"], ["blocks.0.query.weight", "blocks.0.query.bias", "blocks.1.query.weight",
                         "blocks.1.query.bias", "head.weight", "head.bias"]),
]
IDS = ["container", "glob", "bare-last-part", "bare-top-level", "star-dot", "tensor", "bare-tensor", "regex",
       "type", "callable", "list-union"]


@pytest.mark.parametrize("pattern, expected", TABLE, ids=IDS)
def test_every_tensor_argument_selects_the_same(pattern, expected, tmp_path):
    expected = [n for n in PARAMS if n in expected]  # registration order
    model = net()
    assert peftlite.freeze(model, *selection.as_list(pattern)) == expected
    assert peftlite.unfreeze(model, *selection.as_list(pattern)) == expected

    trained = peftlite.wrap(net(), trainable=pattern)  # trainable= trains (and saves) exactly these
    assert [n for n, p in trained.named_parameters() if p.requires_grad] == expected
    assert set(native.read(peftlite.save(trained, tmp_path / "t.safetensors"))[0]) == set(expected)

    everything = peftlite.wrap(net(), trainable="*")
    partial = peftlite.save(everything, tmp_path / "p.safetensors", include=pattern)
    assert set(native.read(partial)[0]) == set(expected)

    model = net()
    lrs = {pattern: 0.5} if not isinstance(pattern, list) else dict.fromkeys(pattern, 0.5)
    groups = peftlite.param_groups(model, 1.0, lrs=lrs, no_decay=())
    ids = {id(p): n for n, p in model.named_parameters()}
    assert sorted(ids[id(p)] for g in groups if g["lr"] == 0.5 for p in g["params"]) == sorted(expected)

    model = net()
    groups = peftlite.param_groups(model, 1.0, weight_decay=0.1, no_decay=pattern)
    no_decay = {ids_ for g in groups if g["weight_decay"] == 0 for ids_ in (id(p) for p in g["params"])}
    names = {id(p): n for n, p in model.named_parameters()}
    excluded_by_default = {n for n in PARAMS if n.endswith(".bias") or ".norm." in n}
    assert {names[i] for i in no_decay} == set(expected) | excluded_by_default

    model = net()
    opt = torch.optim.SGD([p for n, p in model.named_parameters() if n not in expected] or
                          [nn.Parameter(torch.zeros(1))], lr=0.1)
    unfreezer = peftlite.Unfreezer(model, opt, {1: pattern})
    assert unfreezer.stages[1] == expected


MODULE_TABLE = [
    ("blocks.0", ["blocks.0.query", "blocks.0.value"]),  # a container adapts the layers beneath it
    ("query", ["blocks.0.query", "blocks.1.query"]),
    ("value", ["value"]),
    ("*.value", ["blocks.0.value", "blocks.1.value"]),
    (re.compile(r"blocks\.1\.(query|value)"), ["blocks.1.query", "blocks.1.value"]),
    (nn.Linear, ["blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value", "value", "head"]),
    (lambda name, m: name == "head", ["head"]),
    (["head", "query"], ["blocks.0.query", "blocks.1.query", "head"]),
    ([nn.Conv2d, nn.Linear], ["blocks.0.query", "blocks.0.value", "blocks.1.query", "blocks.1.value", "value",
                              "head"]),  # a union: the model has no Conv2d, and that is fine
]


@pytest.mark.parametrize("pattern, expected", MODULE_TABLE, ids=IDS[:3] + IDS[4:5] + IDS[7:9] + IDS[9:11] + ["types"])
def test_targets_select_the_same_modules(pattern, expected):
    model = peftlite.wrap(net(), pattern, rank=2)
    assert [n for n, _ in peftlite.layers.adapted_layers(model)] == expected


def test_heads_keys_select_exactly_one_module():
    model = net()
    peftlite.wrap(model, heads={"head": nn.Linear(8, 5)})
    assert model.head.out_features == 5
    model = net()
    snap = snapshot(model)
    with pytest.raises(ValueError, match=r"heads\['query'\] selects 2 modules \(blocks\.0\.query, blocks\.1\.query\)"):
        peftlite.wrap(model, heads={"query": nn.Linear(8, 8)})
    with pytest.raises(ValueError, match=r"heads\['blocks\.\*\.norm'\] selects 2 modules"):
        peftlite.wrap(model, heads={"blocks.*.norm": nn.LayerNorm(8)})
    assert_unchanged(model, snap)
    peftlite.wrap(model, heads={"blocks.1.norm": nn.Identity()})  # a full name
    assert isinstance(model.blocks[1].norm, nn.Identity)


def test_a_list_raises_only_when_all_of_it_selects_nothing_or_an_exact_name_is_a_typo():
    model = net()
    snap = snapshot(model)
    peftlite.wrap(net(), ["*.query", "conv*", re.compile("nothing"), nn.Conv2d], rank=2)  # the union is enough
    with pytest.raises(ValueError, match=r"targets: 'conv\*', re.compile\('nothing'\), Conv2d selected no adaptable"):
        peftlite.wrap(model, ["conv*", re.compile("nothing"), nn.Conv2d])
    with pytest.raises(ValueError, match=r"targets: 'valeu' names no module \(neither as a full name nor as the "
                                         r"last part of one\)"):
        peftlite.wrap(model, ["*.query", "valeu"])
    with pytest.raises(ValueError, match=r"'blocks\.2\.query' names no module \(as a full name\)"):
        peftlite.wrap(model, ["*.query", "blocks.2.query"])
    assert_unchanged(model, snap)
    assert peftlite.param_groups(net(), 1.0, no_decay=("nothing_here", "nothing*"))  # no_decay never raises


def test_hints_list_patterns_that_would_match_with_counts():
    model = net()
    with pytest.raises(ValueError) as e:
        peftlite.wrap(model, "querry")
    assert "'*.query' (2 adaptable modules)" in str(e.value)
    with pytest.raises(ValueError, match=r"selected no adaptable module .*the model has: Linear \(6\)"):
        peftlite.wrap(model, nn.Conv1d)
    with pytest.raises(ValueError) as e:
        peftlite.freeze(model, "blocks.0.quer")
    assert "'blocks.0.query' (2 tensors)" in str(e.value)
    with pytest.raises(ValueError, match=r"freeze: Conv2d selected no module or tensor; the model has: Linear \(6\), "
                                         r"LayerNorm \(2\)"):
        peftlite.freeze(model, nn.Conv2d)
    with pytest.raises(ValueError, match="'fc.weight' names no module"):
        peftlite.wrap(model, "fc.weight")


def test_bare_name_that_is_top_level_and_a_last_part_selects_the_top_level_one():
    """ResNet-50's ``conv1`` is the stem and the last part of 16 block convs: the stem, unlike PEFT's rule."""
    peft = pytest.importorskip("peft")
    torch.manual_seed(0)
    model = peftlite.wrap(torchvision.models.resnet50(), "conv1", rank=2)
    assert [n for n, _ in peftlite.layers.adapted_layers(model)] == ["conv1"]
    model = peftlite.wrap(torchvision.models.resnet50(), ["conv1", "*.conv1"], rank=2)
    assert len(peftlite.layers.adapted_layers(model)) == 17
    theirs = peft.get_peft_model(torchvision.models.resnet50(), peft.LoraConfig(r=2, target_modules=["conv1"]))
    assert sum(1 for n, _ in theirs.named_modules() if n.endswith("lora_A")) == 17


def test_not_a_pattern_is_a_type_error():
    for bad in (42, b"fc", ""):
        with pytest.raises(TypeError, match="is not a pattern; use a name or glob string"):
            peftlite.freeze(net(), bad)
    with pytest.raises(TypeError, match=r"targets: 3\.5 \(float\) is not a pattern"):
        peftlite.wrap(net(), [3.5])
