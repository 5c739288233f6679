"""Scenario 1: train only a new head on a frozen backbone.

The backbone was "pretrained" on digits 0-4; a new 5-way head learns digits 5-9. wrap() freezes every
base parameter and every BatchNorm's statistics (train mode included), so only the head changes.

    python examples/01_head_only.py [--tensorboard runs]    # then: tensorboard --logdir runs
"""

import torch
from torch import nn

import peftlite
from peftlite.demo.digits import NEW_CLASSES, accuracy, digit_split, example_arguments, pretrained_backbone, train

args = example_arguments(__doc__)
torch.manual_seed(0)
model = pretrained_backbone()
peftlite.wrap(model, heads={"fc": nn.Linear(model.fc.in_features, len(NEW_CLASSES))})
print(peftlite.summary(model))

split = digit_split(NEW_CLASSES)
opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))
train(model, split, opt, epochs=10, desc="head only", tensorboard=args.tensorboard)
print(f"final accuracy on digits 5-9 (head only): {accuracy(model, split.x_test, split.y_test):.3f}")
