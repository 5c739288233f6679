"""Scenario 2: train the last stage and a new head: a small LR for the stage, a large one for the head.

layer3 is named in trainable=, so it trains in full (its BatchNorms adapt their statistics) and is saved
with the head; everything below it stays frozen.

    python examples/02_discriminative_lrs.py [--tensorboard runs]    # then: tensorboard --logdir runs
"""

import torch
from torch import nn

import peftlite
from peftlite.demo.digits import NEW_CLASSES, accuracy, digit_split, example_arguments, pretrained_backbone, train

args = example_arguments(__doc__)
torch.manual_seed(0)
model = pretrained_backbone()
peftlite.wrap(model, heads={"fc": nn.Linear(model.fc.in_features, len(NEW_CLASSES))}, trainable=["layer3"])

groups = peftlite.param_groups(model, 1e-3, lrs={"fc": 1e-2, "layer3": 1e-3}, weight_decay=0.01)
for g in groups:
    print(f"{g['name']:<22} lr={g['lr']:.0e}  weight_decay={g['weight_decay']}  params={len(g['params'])}")

split = digit_split(NEW_CLASSES)
train(model, split, torch.optim.AdamW(groups), epochs=10, desc="layer3 + head", tensorboard=args.tensorboard)
print(f"final accuracy on digits 5-9 (layer3 + head): {accuracy(model, split.x_test, split.y_test):.3f}")
