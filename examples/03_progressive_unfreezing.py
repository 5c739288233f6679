"""Scenario 3: progressive unfreezing: the head first, then layer3 at epoch 2, then layer2 at epoch 4.

The Unfreezer puts layer3 and layer2 in the optimizer from the start, frozen, so the LR scheduler sees
every group from its first step; step(epoch) unfreezes them on time.

    python examples/03_progressive_unfreezing.py [--tensorboard runs]    # then: tensorboard --logdir runs
"""

import torch
from torch import nn

import peftlite
from peftlite.demo.digits import NEW_CLASSES, accuracy, digit_split, example_arguments, pretrained_backbone, train

EPOCHS = 10

args = example_arguments(__doc__)
torch.manual_seed(0)
model = pretrained_backbone()
model.fc = nn.Linear(model.fc.in_features, len(NEW_CLASSES))
peftlite.freeze(model)
peftlite.unfreeze(model, "fc")

opt = torch.optim.AdamW(peftlite.param_groups(model, 1e-2))
unfreezer = peftlite.Unfreezer(model, opt, {0: ["fc"], 2: ["layer3"], 4: ["layer2"]},
                               lr=1e-3, layer_decay=0.5)
sched = torch.optim.lr_scheduler.CosineAnnealingLR(opt, T_max=EPOCHS)  # created after the Unfreezer
print("groups:", ", ".join(f"{g['name']} (lr {g['lr']:.1e})" for g in opt.param_groups))


def on_epoch(epoch):
    if epoch:
        sched.step()
    newly = unfreezer.step(epoch)
    if newly:
        print(f"epoch {epoch}: unfroze {len(newly)} parameters ({newly[0]}, ...)")


split = digit_split(NEW_CLASSES)
history = train(model, split, opt, epochs=EPOCHS, desc="progressive", on_epoch=on_epoch, tensorboard=args.tensorboard)
print("test accuracy per epoch:", " ".join(f"{h['accuracy']:.2f}" for h in history))
acc = accuracy(model, split.x_test, split.y_test)
print(f"final accuracy on digits 5-9 (progressive unfreezing): {acc:.3f}")
