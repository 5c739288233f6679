"""Scenario 5: two task heads on one shared, frozen backbone; one adapter file per head.

Tasks on digits 5-9: "digit" (which digit, 5-way) and "parity" (odd or even). The heads are trained one
after the other, each is saved to its own file, and the files are loaded one at a time into a second
model with untrained heads.

    python examples/05_multitask_heads.py [--tensorboard runs]    # then: tensorboard --logdir runs
"""

import os
import tempfile

import torch
from torch import nn

import peftlite
from peftlite.demo.digits import (
    NEW_CLASSES,
    Split,
    accuracy,
    digit_split,
    example_arguments,
    pretrained_backbone,
    tiny_resnet,
    train,
)


class MultiTask(nn.Module):
    """A backbone and named heads; forward(x, task) routes to one head."""

    def __init__(self, backbone: nn.Module):
        super().__init__()
        width = backbone.fc.in_features
        backbone.fc = nn.Identity()
        self.backbone = backbone
        self.heads = nn.ModuleDict({"digit": nn.Linear(width, len(NEW_CLASSES)),
                                    "parity": nn.Linear(width, 2)})

    def forward(self, x, task: str):
        return self.heads[task](self.backbone(x))


class Task(nn.Module):
    """One task's view of the model, for the single-output train() and accuracy() helpers."""

    def __init__(self, model: MultiTask, task: str):
        super().__init__()
        self.model, self.task = model, task

    def forward(self, x):
        return self.model(x, self.task)


args = example_arguments(__doc__)
torch.manual_seed(0)
pretrained = pretrained_backbone()
weights = {k: v.clone() for k, v in pretrained.state_dict().items()}
model = peftlite.wrap(MultiTask(pretrained), trainable=["heads.*"])

data = digit_split(NEW_CLASSES)
odd = lambda y: (y + NEW_CLASSES[0]) % 2  # noqa: E731  labels 0..4 are digits 5..9
splits = {"digit": data, "parity": Split(data.x_train, odd(data.y_train), data.x_test, odd(data.y_test))}

folder = tempfile.mkdtemp()
for task, split in splits.items():  # separately: only this task's head trains
    peftlite.freeze(model, "heads")
    peftlite.unfreeze(model, f"heads.{task}")
    opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))
    train(Task(model, task), split, opt, epochs=8, desc=task, tensorboard=args.tensorboard)
    path = peftlite.save(model, os.path.join(folder, f"{task}.safetensors"), include=[f"heads.{task}*"])
    print(f"saved head {task!r}: {os.path.getsize(path):,} bytes")

# A second model: the same pretrained backbone, untrained heads. Load one head at a time.
backbone = tiny_resnet()
backbone.load_state_dict(weights)
other = peftlite.wrap(MultiTask(backbone), trainable=["heads.*"])
untouched = other.heads.parity.weight.detach().clone()
peftlite.load(other, os.path.join(folder, "digit.safetensors"), strict=True)
assert torch.equal(other.heads.parity.weight, untouched), "loading the digit head changed the parity head"
peftlite.load(other, os.path.join(folder, "parity.safetensors"), strict=True)

for task, split in splits.items():
    acc = accuracy(Task(other, task), split.x_test, split.y_test)
    print(f"final accuracy on digits 5-9, task {task!r} (heads loaded from their files): {acc:.3f}")
