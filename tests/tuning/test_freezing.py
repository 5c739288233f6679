"""freeze / unfreeze by glob on module or parameter names."""

from __future__ import annotations

import pytest
import torch
import torchvision

import peftlite
from peftlite.demo.digits import tiny_resnet


def _trainable(model):
    return {n for n, p in model.named_parameters() if p.requires_grad}


def test_module_and_parameter_globs():
    model = torchvision.models.resnet18(num_classes=3)
    peftlite.freeze(model)
    assert _trainable(model) == set()
    assert peftlite.unfreeze(model, "fc") == ["fc.weight", "fc.bias"]
    peftlite.unfreeze(model, "layer4.1.*", "layer3.0.conv1.weight")
    expected = {n for n, _ in model.named_parameters() if n.startswith(("fc.", "layer4.1."))}
    assert _trainable(model) == expected | {"layer3.0.conv1.weight"}
    peftlite.freeze(model, "*.bias")
    assert _trainable(model) == {n for n in expected if not n.endswith(".bias")} | {"layer3.0.conv1.weight"}
    peftlite.unfreeze(model)
    assert _trainable(model) == {n for n, _ in model.named_parameters()}


def test_unmatched_patterns_list_what_would_match_and_change_nothing():
    model = torchvision.models.resnet18(num_classes=3)
    peftlite.freeze(model, "layer1")
    before = _trainable(model)
    with pytest.raises(ValueError, match=r"unfreeze: 'layer9\.\*' selected no module or tensor; "
                                         r"patterns that would match: 'layer\d\.\*' \(\d+ tensors\)"):
        peftlite.unfreeze(model, "layer9.*")
    with pytest.raises(ValueError, match=r"unfreeze: 'layer9' names no module or tensor \(neither as a full name "
                                         r"nor as the last part of one\)"):
        peftlite.unfreeze(model, "fc", "layer9")  # an exact name that names nothing is a typo, even in a list
    assert _trainable(model) == before
    with pytest.raises(TypeError, match=r"freeze: 3 \(int\) is not a pattern"):
        peftlite.freeze(model, 3)
    assert peftlite.unfreeze(model, "fc", "layer9.*") == ["fc.weight", "fc.bias"]  # a list is a union


def test_unfreezing_a_frozen_batchnorm_trains_its_affine_but_not_its_statistics():
    torch.manual_seed(0)
    model = peftlite.wrap(tiny_resnet(5), "layer3.*", rank=2)
    bn = model.layer2[0].bn1
    assert type(bn).__name__ == "FrozenBatchNorm2d"
    with pytest.warns(UserWarning, match="not saved by"):
        peftlite.unfreeze(model, "layer2.0.bn1")
    assert bn.weight.requires_grad and bn.bias.requires_grad
    stats = (bn.running_mean.clone(), bn.running_var.clone(), bn.num_batches_tracked.clone())
    model.train()
    model(torch.randn(8, 1, 16, 16)).sum().backward()
    assert bn.weight.grad is not None
    now = (bn.running_mean, bn.running_var, bn.num_batches_tracked)
    assert all(torch.equal(a, b) for a, b in zip(stats, now, strict=True))


def test_unfreeze_of_saved_modules_does_not_warn(recwarn):
    model = peftlite.wrap(tiny_resnet(5), "layer3.*", rank=2, trainable=["fc"])
    peftlite.freeze(model, "fc")
    peftlite.unfreeze(model, "fc", "*.lora.*")
    assert not [w for w in recwarn if "not saved" in str(w.message)]
