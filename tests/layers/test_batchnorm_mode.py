"""A frozen BatchNorm's ``training`` is what ``model.train()`` / ``model.eval()`` set, while its forward
normalises with the running statistics in both modes (the eval-mode output of the same BatchNorm, the
independent reference) and never updates them: torch's and timm's BatchNorms, eager and compiled."""

from __future__ import annotations

import copy

import pytest
import timm
import torch
import torch.nn.functional as F
import torchvision
from timm.layers.norm_act import BatchNormAct2d
from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm

import peftlite
from peftlite.demo.digits import tiny_resnet
from peftlite.layers import batchnorm

STATISTICS = ("running_mean", "running_var", "num_batches_tracked")


def pretend_pretrained(model: nn.Module, seed: int = 1) -> nn.Module:
    """Non-trivial running statistics and affine parameters, as a pretrained backbone has."""
    g = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for m in model.modules():
            if isinstance(m, _BatchNorm):
                m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.5)
                m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                m.num_batches_tracked.fill_(100)
                if m.affine:
                    m.weight.copy_(torch.rand(m.num_features, generator=g) + 0.5)
                    m.bias.copy_(torch.randn(m.num_features, generator=g) * 0.1)
    return model


def statistics(model: nn.Module) -> dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in model.state_dict().items() if k.rsplit(".", 1)[-1] in STATISTICS}


def base_keys(model: nn.Module) -> list[str]:
    """The state_dict keys less those an adapted layer adds (its adapters and its merge state)."""
    return [k for k in model.state_dict() if ".lora." not in k and not k.endswith("._extra_state")]


def bns(model: nn.Module) -> list[nn.Module]:
    return [m for m in model.modules() if isinstance(m, _BatchNorm)]


def assert_same(a: dict[str, torch.Tensor], b: dict[str, torch.Tensor]) -> None:
    assert a.keys() == b.keys()
    for k in a:
        assert torch.equal(a[k], b[k]), k


# ---- one BatchNorm: each kind, in each mode --------------------------------------------------------

LAYERS = {  # name: (make, input shape)
    "1d-NC": (lambda: nn.BatchNorm1d(6), (8, 6)),
    "1d-NCL": (lambda: nn.BatchNorm1d(6), (4, 6, 5)),
    "2d": (lambda: nn.BatchNorm2d(6), (4, 6, 5, 5)),
    "3d": (lambda: nn.BatchNorm3d(6), (2, 6, 3, 4, 4)),
    "2d-momentum-None": (lambda: nn.BatchNorm2d(6, momentum=None), (4, 6, 5, 5)),
    "2d-no-affine": (lambda: nn.BatchNorm2d(6, affine=False), (4, 6, 5, 5)),
    "sync": (lambda: nn.SyncBatchNorm(6), (4, 6, 5, 5)),  # its own forward; eval mode needs no process group
    "timm-BatchNormAct2d": (lambda: BatchNormAct2d(6, act_layer=nn.SiLU), (4, 6, 5, 5)),
}


@pytest.mark.parametrize("layer", list(LAYERS))
def test_frozen_forward_is_the_eval_forward_in_both_modes_and_never_updates(layer):
    make, shape = LAYERS[layer]
    torch.manual_seed(0)
    bn = pretend_pretrained(make().double())
    reference = copy.deepcopy(bn).eval()
    for p in reference.parameters():
        p.requires_grad_(False)
    batchnorm.freeze_stats(bn)
    bn.requires_grad_(False)  # wrap freezes the affine parameters too
    assert type(bn).__name__ == f"Frozen{type(reference).__name__}" and isinstance(bn, type(reference))
    before = {k: v.clone() for k, v in bn.state_dict().items()}
    x = (torch.randn(*shape, dtype=torch.float64) * 3 + 1).requires_grad_()
    want = reference(x)
    (want_grad,) = torch.autograd.grad(want.square().sum(), x)
    for mode in (True, False, True):
        bn.train(mode)
        assert bn.training is mode
        got = bn(x)
        assert bn.training is mode, "the forward gave the mode back"
        assert torch.equal(got, want), mode  # the same F.batch_norm call as eval mode's
        (grad,) = torch.autograd.grad(got.square().sum(), x)
        torch.testing.assert_close(grad, want_grad, rtol=1e-12, atol=1e-12)
        with torch.no_grad():
            assert torch.equal(bn(x), want)
    assert_same(before, bn.state_dict())  # running statistics and num_batches_tracked, in train mode too
    batchnorm.unfreeze_stats(bn)
    assert type(bn) is type(reference) and bn.training is True


def test_a_forward_that_raises_gives_the_mode_back():
    bn = BatchNormAct2d(4)
    batchnorm.freeze_stats(bn)
    bn.train()
    with pytest.raises(AssertionError, match="expected 4D input"):
        bn(torch.randn(2, 4, 5))  # timm's own forward refuses a 3-D input
    assert bn.training is True


def test_timm_BatchNormAct2d_keeps_the_mode_of_its_drop_and_act():
    bn = BatchNormAct2d(4, drop_layer=nn.Dropout)
    seen = []
    bn.drop.register_forward_pre_hook(lambda m, args: seen.append((m.training, bn.training)))
    batchnorm.freeze_stats(bn)
    bn.train()
    bn(torch.randn(2, 4, 3, 3))
    assert seen == [(True, False)]  # the dropout trains; the normalisation runs as in eval mode


# ---- whole models ------------------------------------------------------------------------------------

def test_training_follows_train_and_eval_through_wrap_and_unwrap():
    model = pretend_pretrained(tiny_resnet(5)).eval()
    keys = list(model.state_dict())
    peftlite.wrap(model, "layer3.*", rank=2, trainable=["fc"])
    frozen = bns(model)
    assert frozen and all(isinstance(m, batchnorm.FrozenStats) for m in frozen)
    assert not any(m.training for m in frozen), "wrap keeps the mode the model was in"
    model.train()
    assert all(m.training for m in model.modules())
    model.eval()
    assert not any(m.training for m in model.modules())
    model.train()
    assert base_keys(model) == keys
    peftlite.unwrap(model)
    assert all(type(m) is nn.BatchNorm2d for m in bns(model)) and list(model.state_dict()) == keys
    assert all(m.training for m in model.modules()), "unwrap leaves the mode as it is"


@pytest.mark.parametrize("make", [
    lambda: torchvision.models.resnet18(num_classes=3),
    lambda: timm.create_model("resnet18", pretrained=False, num_classes=3),
    lambda: timm.create_model("efficientnet_b0", pretrained=False, num_classes=3, drop_rate=0.0),
], ids=["torchvision-resnet18", "timm-resnet18", "timm-efficientnet_b0"])
def test_a_frozen_backbone_trains_with_the_eval_outputs_and_its_statistics(make):
    torch.manual_seed(0)
    base = pretend_pretrained(make()).eval()
    model = peftlite.wrap(copy.deepcopy(base), nn.Linear, rank=2)
    assert base_keys(model) == list(base.state_dict())  # nothing renamed
    kinds = {type(m).__name__ for m in bns(model)}
    assert kinds == {f"Frozen{type(m).__name__}" for m in bns(base)}, kinds
    stats = statistics(model)
    model.train()
    assert all(m.training for m in bns(model))
    x, y = torch.randn(2, 3, 32, 32), torch.tensor([0, 2])
    opt = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    with torch.no_grad():
        want = base(x)
    out = model(x)
    torch.testing.assert_close(out, want, rtol=0, atol=0)  # B = 0: the eval-mode base, in train mode
    for _ in range(2):
        opt.zero_grad()
        F.cross_entropy(model(x), y).backward()
        opt.step()
    assert_same(stats, statistics(model))
    assert all(m.training for m in bns(model))


def test_deepcopy_keeps_the_frozen_class_and_the_mode():
    model = peftlite.wrap(pretend_pretrained(tiny_resnet(5)), "layer3.*", rank=2).train()
    twin = copy.deepcopy(model)
    assert [type(m) for m in twin.modules()] == [type(m) for m in model.modules()]
    assert all(m.training for m in bns(twin))
    stats = statistics(twin)
    twin(torch.randn(4, 1, 16, 16)).sum().backward()
    assert_same(stats, statistics(twin))
    x = torch.randn(4, 1, 16, 16)
    torch.testing.assert_close(twin(x), model(x), rtol=0, atol=0)


class Small(nn.Module):
    """conv - BatchNorm2d - conv - timm BatchNormAct2d - Linear: both kinds of frozen forward."""

    def __init__(self):
        super().__init__()
        self.conv1, self.bn1 = nn.Conv2d(3, 8, 3, padding=1), nn.BatchNorm2d(8)
        self.conv2, self.bn2 = nn.Conv2d(8, 8, 3, padding=1), BatchNormAct2d(8)
        self.fc = nn.Linear(8, 3)

    def forward(self, x):
        return self.fc(self.bn2(self.conv2(torch.relu(self.bn1(self.conv1(x))))).mean((2, 3)))


def test_compiled_training_uses_the_running_statistics_without_graph_breaks():
    torch.manual_seed(0)
    base = pretend_pretrained(Small()).eval()
    model = peftlite.wrap(copy.deepcopy(base), "fc", rank=2).train()
    x, y = torch.randn(4, 3, 8, 8), torch.tensor([0, 1, 2, 1])
    assert torch._dynamo.explain(copy.deepcopy(model))(x).graph_break_count == 0
    torch._dynamo.reset()
    compiled = torch.compile(model, fullgraph=True, backend="aot_eager")
    stats = statistics(model)
    with torch.no_grad():
        want = base(x)
    out = compiled(x)
    torch.testing.assert_close(out, want, rtol=1e-6, atol=1e-6)
    F.cross_entropy(out, y).backward()
    assert model.fc.lora["default"].B.grad is not None
    assert_same(stats, statistics(model))
    assert model.bn1.training and model.bn2.training  # the graph wrote back what it read
    model.eval()  # a mode change recompiles; the values stay those of eval mode
    with torch.no_grad():
        torch.testing.assert_close(compiled(x), want, rtol=1e-6, atol=1e-6)
    assert not model.bn2.training
