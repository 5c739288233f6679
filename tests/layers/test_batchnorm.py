"""BatchNorm policy: statistics frozen by default (train mode included), adapting with train_bn=True,
and both round-trip through the adapter file."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
import torchvision
from torch import nn

import peftlite
from peftlite.demo.digits import tiny_resnet
from peftlite.formats import native


@pytest.fixture(scope="module")
def base():
    """A backbone whose BatchNorms hold non-trivial statistics (as a pretrained one would)."""
    torch.manual_seed(0)
    model = tiny_resnet(5)
    g = torch.Generator().manual_seed(1)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.1)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.num_batches_tracked.fill_(100)
    return model.eval()


def _bn_state(model):
    return {k: v.clone() for k, v in model.state_dict().items()
            if k.endswith(("running_mean", "running_var", "num_batches_tracked"))}


def _train_steps(model, steps=3):
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    g = torch.Generator().manual_seed(2)
    model.train()
    for _ in range(steps):
        x, y = torch.randn(16, 1, 16, 16, generator=g) * 2 + 1, torch.randint(0, 5, (16,), generator=g)
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()


def _same(a, b):
    return a.keys() == b.keys() and all(torch.equal(a[k], b[k]) for k in a)


def test_default_freezes_statistics_even_in_train_mode(base):
    model = peftlite.wrap(copy.deepcopy(base), "layer3.*", rank=2, trainable=["fc"])
    stats = _bn_state(model)
    bns = [m for m in model.modules() if isinstance(m, nn.BatchNorm2d)]
    assert bns and all(type(m).__name__ == "FrozenBatchNorm2d" and not m.weight.requires_grad for m in bns)
    _train_steps(model)
    assert _same(stats, _bn_state(model))
    x = torch.randn(4, 1, 16, 16)
    model.train()
    y_train = model(x)
    model.eval()
    torch.testing.assert_close(y_train, model(x), rtol=0, atol=0)  # train mode normalises like eval mode


def test_train_bn_adapts_statistics_and_affine(base):
    model = peftlite.wrap(copy.deepcopy(base), "layer3.*", rank=2, trainable=["fc"], train_bn=True)
    bn = model.layer1[0].bn1
    assert type(bn) is nn.BatchNorm2d and bn.weight.requires_grad
    stats, weight = _bn_state(model), bn.weight.detach().clone()
    _train_steps(model)
    after = _bn_state(model)
    assert all(not torch.equal(stats[k], after[k]) for k in stats)
    assert not torch.equal(weight, bn.weight)


@pytest.mark.parametrize("train_bn", [False, True])
def test_statistics_round_trip_through_the_file(base, train_bn, tmp_path):
    model = peftlite.wrap(copy.deepcopy(base), "layer3.*", rank=2, trainable=["fc"], train_bn=train_bn)
    _train_steps(model)
    path = peftlite.save(model, tmp_path / "adapter.safetensors")
    keys = set(native.read(path)[0])
    assert any(k.endswith("bn1.running_mean") for k in keys) == train_bn
    loaded = peftlite.load(copy.deepcopy(base), path)  # into the unwrapped base
    assert _same(_bn_state(model), _bn_state(loaded))
    if not train_bn:
        assert _same(_bn_state(base), _bn_state(loaded))
    assert [type(m).__name__ for m in loaded.modules()] == [type(m).__name__ for m in model.modules()]
    x = torch.randn(4, 1, 16, 16)
    model.eval()
    loaded.eval()
    torch.testing.assert_close(model(x), loaded(x), rtol=0, atol=0)


def test_frozen_batchnorm_keeps_running_stats_in_train_mode(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    keys = list(model.state_dict())
    peftlite.wrap(model, "layer4.*", rank=2)
    stats = {k: v.clone() for k, v in model.state_dict().items() if "running" in k or "num_batches" in k}
    model.train()
    x = torch.randn(4, 3, 32, 32)
    y_train = model(x)
    assert type(model.bn1).__name__ == "FrozenBatchNorm2d" and model.bn1.training is True  # what train() set
    for k, v in stats.items():
        assert torch.equal(model.state_dict()[k], v), k
    model.eval()
    assert model.bn1.training is False
    with torch.no_grad():
        torch.testing.assert_close(model(x), y_train.detach())
    peftlite.unwrap(model)
    assert type(model.bn1) is nn.BatchNorm2d and list(model.state_dict()) == keys


def test_train_bn_adapts_and_round_trips(tmp_path):
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    peftlite.wrap(model, "layer4.*", rank=2, train_bn=True)
    assert model.bn1.weight.requires_grad and type(model.bn1) is nn.BatchNorm2d
    model.train()
    model(torch.randn(4, 3, 32, 32))
    assert model.bn1.num_batches_tracked.item() == 1
    path = peftlite.save(model, tmp_path / "bn.safetensors")
    torch.manual_seed(0)
    fresh = peftlite.load(torchvision.models.resnet18(num_classes=3), path)
    for k, v in model.state_dict().items():
        if "bn" in k or "downsample.1" in k:
            assert torch.equal(fresh.state_dict()[k], v), k
