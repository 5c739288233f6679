"""summary(): the per-layer table of what trains, its totals, the merged state and the block notes."""

import warnings

import torch
import torchvision
from torch import nn

import peftlite


def test_summary_table():
    torch.manual_seed(0)
    model = torchvision.models.resnet18(num_classes=3)
    peftlite.wrap(model, "layer4.0.conv1", rank=4, heads={"fc": nn.Linear(512, 7)})
    s = peftlite.summary(model)
    assert s.total == sum(p.numel() for p in model.parameters())
    assert s.trainable == 4 * (256 * 9) + 512 * 4 + 512 * 7 + 7
    text = str(s)
    assert "layer4.0.conv1" in text and "Conv2d (lora)" in text and "512x256x3x3" in text
    assert f"trainable {s.trainable:,} of {s.total:,} parameters" in text
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        peftlite.merge(model)
    assert "lora merged" in str(peftlite.summary(model))
