"""Scenario 6: PiSSA, the adapter started from each conv's principal part; shared as a plain LoRA on the original model.

The base weights hold the residual W - scale·B0 A0 while training; the saved file is the plain rank-2r LoRA
on the ORIGINAL weights, so the untouched pretrained model loads it (peftlite, or PEFT with format="peft"),
and restore_base gives the original weights back, bit for bit.

    python examples/06_pissa.py [--tensorboard runs]
"""

import copy
import tempfile
from pathlib import Path

import torch
from torch import nn

import peftlite
from peftlite.demo.digits import NEW_CLASSES, accuracy, digit_split, example_arguments, pretrained_backbone, train

args = example_arguments(__doc__)
torch.manual_seed(0)
pretrained = pretrained_backbone()
original = {k: v.clone() for k, v in pretrained.state_dict().items()}
model = copy.deepcopy(pretrained)
peftlite.wrap(model, nn.Conv2d, rank=4, init="pissa",  # or "pissa_niter_4" (fast), "olora"
              heads={"fc": nn.Linear(model.fc.in_features, len(NEW_CLASSES))})

split = digit_split(NEW_CLASSES)
train(model, split, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=3e-3), epochs=6,
      desc="pissa", tensorboard=args.tensorboard)
print(f"final accuracy on digits 5-9 (PiSSA): {accuracy(model, split.x_test, split.y_test):.3f}")

path = Path(tempfile.mkdtemp()) / "pissa.safetensors"
peftlite.save(model, path)  # rank 8 = 2 × 4 on the original weights; its config says "init": "pissa"
fresh = copy.deepcopy(pretrained)  # the untouched pretrained model
peftlite.load(fresh, path)
model.eval()
fresh.eval()
with torch.no_grad():
    gap = (fresh(split.x_test) - model(split.x_test)).abs().max()
print(f"file on the original model, max |Δ output|: {gap:.1e}")

peftlite.restore_base(model)  # the original weights, the adapter now a rank-8 LoRA on them
base = {k: v for k, v in model.state_dict().items() if k in original}
same = all(torch.equal(v, original[k]) for k, v in base.items() if not k.startswith("fc."))  # fc: the new head
print("original weights back bit for bit:", same)
