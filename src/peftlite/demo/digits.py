"""Real data with no download, and a tiny ResNet, for the demo and the examples (a public helper module).

scikit-learn ships 1,797 8x8 handwritten digits. A small torchvision-style ResNet is "pretrained" on
digits 0-4, then adapted to digits 5-9: a transfer task that runs in seconds on a laptop CPU.
Needs the ``demo`` extra (scikit-learn, tqdm); TensorBoard logging (``--tensorboard DIR``) the
``tensorboard`` extra.
"""

from __future__ import annotations

import argparse
import contextlib
import os
import re
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torchvision.models.resnet import BasicBlock

from ..integrations.tensorboard import summary_writer
from . import options

BASE_CLASSES = (0, 1, 2, 3, 4)
NEW_CLASSES = (5, 6, 7, 8, 9)


@dataclass
class Split:
    x_train: Tensor  # (N, 1, 16, 16), standardised
    y_train: Tensor  # (N,) labels 0..len(classes)-1
    x_test: Tensor
    y_test: Tensor


def digit_split(classes=BASE_CLASSES, seed: int = 0, test_fraction: float = 0.3) -> Split:
    """The digits of ``classes``, upsampled to 16x16, split into train/test per class."""
    try:
        from sklearn.datasets import load_digits
    except ImportError as e:  # pragma: no cover - exercised only without the extra
        raise ImportError("the digits data needs scikit-learn: pip install 'peftlite[demo]'") from e
    data = load_digits()
    x = torch.tensor(data.images, dtype=torch.float32).unsqueeze(1) / 16.0  # (1797, 1, 8, 8)
    x = F.interpolate(x, size=(16, 16), mode="bilinear", align_corners=False)
    x = (x - 0.5) / 0.5
    y = torch.tensor(data.target)
    g = torch.Generator().manual_seed(seed)
    train, test = [], []
    for label in classes:
        idx = (y == label).nonzero().view(-1)
        idx = idx[torch.randperm(len(idx), generator=g)]
        cut = int(len(idx) * test_fraction)
        test.append(idx[:cut])
        train.append(idx[cut:])
    train, test = torch.cat(train), torch.cat(test)
    remap = torch.full((10,), -1, dtype=torch.long)
    remap[list(classes)] = torch.arange(len(classes))
    return Split(x[train], remap[y[train]], x[test], remap[y[test]])


def tiny_resnet(num_classes: int = len(BASE_CLASSES), width: int = 16) -> nn.Module:
    """A three-stage ResNet in torchvision's naming (conv1, bn1, layer1..3, fc), about 0.1 M params."""

    class TinyResNet(nn.Module):
        def __init__(self):
            super().__init__()
            w = width
            self.conv1 = nn.Conv2d(1, w, 3, padding=1, bias=False)
            self.bn1 = nn.BatchNorm2d(w)
            self.relu = nn.ReLU(inplace=True)
            self.layer1 = nn.Sequential(BasicBlock(w, w))
            self.layer2 = nn.Sequential(BasicBlock(w, 2 * w, 2, _down(w, 2 * w)))
            self.layer3 = nn.Sequential(BasicBlock(2 * w, 4 * w, 2, _down(2 * w, 4 * w)))
            self.avgpool = nn.AdaptiveAvgPool2d(1)
            self.fc = nn.Linear(4 * w, num_classes)

        def forward(self, x: Tensor) -> Tensor:  # (N, 1, 16, 16) -> (N, classes)
            x = self.relu(self.bn1(self.conv1(x)))
            x = self.layer3(self.layer2(self.layer1(x)))
            return self.fc(torch.flatten(self.avgpool(x), 1))

    return TinyResNet()


def _down(cin: int, cout: int) -> nn.Module:
    return nn.Sequential(nn.Conv2d(cin, cout, 1, 2, bias=False), nn.BatchNorm2d(cout))


@torch.no_grad()
def accuracy(model: nn.Module, x: Tensor, y: Tensor) -> float:
    was = model.training
    model.eval()
    acc = (model(x).argmax(1) == y).float().mean().item()
    model.train(was)
    return acc


def train(model: nn.Module, split: Split, optimizer: torch.optim.Optimizer, epochs: int, *,
          batch_size: int = 64, seed: int = 0, desc: str = "train", progress: bool = True,
          on_epoch=None, tensorboard: str | os.PathLike | None = None) -> list[dict]:
    """Plain supervised training; returns one ``{"epoch", "loss", "accuracy"}`` dict per epoch.

    ``on_epoch(epoch)`` is called before each epoch (e.g. for ``peftlite.Unfreezer.step``).
    ``tensorboard``: a folder; each epoch's ``loss/train`` and ``accuracy/test`` are also logged to the
    TensorBoard run ``<tensorboard>/<desc as a name>`` (``"head only"``: ``head_only``), step = epoch.
    """
    from tqdm.auto import tqdm

    g = torch.Generator().manual_seed(seed)
    history = []
    n = len(split.y_train)
    log = contextlib.nullcontext() if tensorboard is None else summary_writer(os.path.join(tensorboard, run_name(desc)))
    with log as writer:
        for epoch in range(epochs):
            if on_epoch is not None:
                on_epoch(epoch)
            model.train()
            order = torch.randperm(n, generator=g)
            total = 0.0
            bar = tqdm(range(0, n, batch_size), desc=f"{desc} {epoch + 1}/{epochs}", leave=False,
                       disable=not progress)
            for start in bar:
                idx = order[start:start + batch_size]
                loss = F.cross_entropy(model(split.x_train[idx]), split.y_train[idx])
                optimizer.zero_grad(set_to_none=True)
                loss.backward()
                optimizer.step()
                total += loss.item() * len(idx)
                bar.set_postfix(loss=f"{loss.item():.3f}")
            history.append({"epoch": epoch + 1, "loss": total / n,
                            "accuracy": accuracy(model, split.x_test, split.y_test)})
            if writer is not None:
                writer.add_scalar("loss/train", history[-1]["loss"], epoch + 1)
                writer.add_scalar("accuracy/test", history[-1]["accuracy"], epoch + 1)
    return history


def run_name(desc: str) -> str:
    """A folder name for a TensorBoard run: ``"LoRA on every Conv2d + head"`` -> ``lora_on_every_conv2d_head``."""
    return re.sub(r"[^a-z0-9]+", "_", desc.lower()).strip("_") or "train"


def example_arguments(doc: str, argv: list[str] | None = None) -> argparse.Namespace:
    """The examples' command line, ``--tensorboard DIR``; ``doc``'s first line is the description."""
    p = argparse.ArgumentParser(description=doc.strip().splitlines()[0])
    options.add_tensorboard(p)
    return p.parse_args(argv)


def pretrained_backbone(seed: int = 0, epochs: int = 8, progress: bool = True) -> nn.Module:
    """A tiny_resnet trained on digits 0-4 (the stand-in for a pretrained model)."""
    torch.manual_seed(seed)
    model = tiny_resnet(len(BASE_CLASSES))
    split = digit_split(BASE_CLASSES, seed)
    train(model, split, torch.optim.AdamW(model.parameters(), lr=3e-3), epochs, seed=seed,
          desc="pretrain on 0-4", progress=progress)
    return model
