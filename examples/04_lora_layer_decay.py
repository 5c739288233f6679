"""Scenario 4: LoRA adapters on every conv, with layer-wise LR decay from the head down to the stem.

summary(model, blocks=True) prints the blocks layer decay scales; each block gets 0.7 times the LR of
the block above it.

    python examples/04_lora_layer_decay.py [--tensorboard runs]    # then: tensorboard --logdir runs
"""

import torch
from torch import nn

import peftlite
from peftlite.demo.digits import NEW_CLASSES, accuracy, digit_split, example_arguments, pretrained_backbone, train

args = example_arguments(__doc__)
torch.manual_seed(0)
model = pretrained_backbone()
peftlite.wrap(model, nn.Conv2d, rank=4, heads={"fc": nn.Linear(model.fc.in_features, len(NEW_CLASSES))})
print(peftlite.summary(model, blocks=True))

groups = peftlite.param_groups(model, 1e-2, layer_decay=0.7, weight_decay=0.01)
print("lr per group:", ", ".join(f"{g['name']}={g['lr']:.1e}" for g in groups))

split = digit_split(NEW_CLASSES)
train(model, split, torch.optim.AdamW(groups), epochs=10, desc="lora + layer decay", tensorboard=args.tensorboard)
print(f"final accuracy on digits 5-9 (LoRA + layer decay): {accuracy(model, split.x_test, split.y_test):.3f}")
