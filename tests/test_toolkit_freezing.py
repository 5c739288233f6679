"""freeze / unfreeze by glob on module or parameter names."""

from __future__ import annotations

import pytest
import torch
import torchvision

import peftlite
from peftlite._digits import tiny_resnet


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


def test_unmatched_pattern_names_nearest_and_changes_nothing():
    model = torchvision.models.resnet18(num_classes=3)
    peftlite.freeze(model, "layer1")
    before = _trainable(model)
    with pytest.raises(ValueError, match=r"unfreeze: pattern 'layer9\.\*' matched no module or parameter; "
                                         r"nearest: layer\d"):
        peftlite.unfreeze(model, "fc", "layer9.*")
    assert _trainable(model) == before
    with pytest.raises(TypeError, match="non-empty glob strings"):
        peftlite.freeze(model, 3)


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
