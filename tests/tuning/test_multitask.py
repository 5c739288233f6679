"""Multi-task heads on a shared frozen backbone: train separately or jointly, one file per head."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import peftlite
from peftlite.demo.digits import tiny_resnet
from peftlite.formats import native


class MultiTask(nn.Module):
    def __init__(self, backbone: nn.Module, heads: dict[str, nn.Module]):
        super().__init__()
        self.backbone = backbone
        self.heads = nn.ModuleDict(heads)

    def forward(self, x, task: str):
        return self.heads[task](self.backbone(x))


def _model(seed):
    torch.manual_seed(0)
    backbone = tiny_resnet(5)
    backbone.fc = nn.Identity()
    torch.manual_seed(seed)
    return MultiTask(backbone, {"cls": nn.Linear(64, 5), "parity": nn.Linear(64, 2)})


def _state(module):
    return {k: v.clone() for k, v in module.state_dict().items()}


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def _step(model, tasks, opt):
    g = torch.Generator().manual_seed(3)
    x = torch.randn(16, 1, 16, 16, generator=g)
    labels = {"cls": torch.randint(0, 5, (16,), generator=g),
              "parity": torch.randint(0, 2, (16,), generator=g)}
    model.train()
    opt.zero_grad(set_to_none=True)
    sum(F.cross_entropy(model(x, t), labels[t]) for t in tasks).backward()
    opt.step()


def test_whole_flow(tmp_path):
    model = peftlite.wrap(_model(1), trainable=["heads.*"])
    backbone = _state(model.backbone)
    assert {n for n, p in model.named_parameters() if p.requires_grad} == {
        "heads.cls.weight", "heads.cls.bias", "heads.parity.weight", "heads.parity.bias"}

    # separately: only the cls head trains
    peftlite.freeze(model, "heads")
    peftlite.unfreeze(model, "heads.cls")
    parity = _state(model.heads.parity)
    cls = _state(model.heads.cls)
    _step(model, ["cls"], torch.optim.SGD(peftlite.param_groups(model, 0.1), lr=0.1))
    assert _same(parity, _state(model.heads.parity)) and not _same(cls, _state(model.heads.cls))

    # jointly: both heads, one optimizer
    peftlite.unfreeze(model, "heads")
    cls, parity = _state(model.heads.cls), _state(model.heads.parity)
    _step(model, ["cls", "parity"], torch.optim.SGD(peftlite.param_groups(model, 0.1), lr=0.1))
    assert not _same(cls, _state(model.heads.cls)) and not _same(parity, _state(model.heads.parity))
    assert _same(backbone, _state(model.backbone))  # frozen backbone, BN statistics included

    # one file per head
    cls_file = peftlite.save(model, tmp_path / "cls.safetensors", include=["heads.cls*"])
    parity_file = peftlite.save(model, tmp_path / "parity.safetensors", include=["heads.parity*"])
    assert set(native.read(cls_file)[0]) == {"heads.cls.weight", "heads.cls.bias"}

    # load one head into another copy without disturbing the other head
    other = peftlite.wrap(_model(2), trainable=["heads.*"])
    other_parity = _state(other.heads.parity)
    peftlite.load(other, cls_file, strict=True)
    assert _same(_state(other.heads.cls), _state(model.heads.cls))
    assert _same(_state(other.heads.parity), other_parity)
    peftlite.load(other, parity_file, strict=True)
    x = torch.randn(4, 1, 16, 16)
    model.eval()
    other.eval()
    for task in ("cls", "parity"):
        torch.testing.assert_close(other(x, task), model(x, task), rtol=0, atol=0)

    # into a fresh, unwrapped model too
    fresh = peftlite.load(_model(3), parity_file, strict=True)
    assert _same(_state(fresh.heads.parity), _state(model.heads.parity))


def test_heads_replaced_at_wrap_time(tmp_path):
    model = _model(1)
    new = nn.Linear(64, 3)
    peftlite.wrap(model, heads={"heads.parity": new})
    assert model.heads.parity is new
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == {"heads.parity.weight", "heads.parity.bias"}
    path = peftlite.save(model, tmp_path / "p.safetensors", include=["heads.parity*"])
    fresh = peftlite.load(_model(5), path)
    assert fresh.heads.parity.out_features == 3 and torch.equal(fresh.heads.parity.weight, new.weight)


def test_include_that_matches_nothing_lists_what_would_match(tmp_path):
    model = peftlite.wrap(_model(1), trainable=["heads.*"])
    with pytest.raises(ValueError, match=r"save include: 'heads.clss' names no module or tensor \(as a full name\); "
                                         r"patterns that would match: 'heads.cls' \(2 tensors\)"):
        peftlite.save(model, tmp_path / "x.safetensors", include=["heads.clss"])
    assert copy.deepcopy(model) is not None
