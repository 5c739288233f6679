"""The demo's command-line options, shared by ``python -m peftlite.demo`` and ``peftlite demo``.

Kept apart from ``run.py`` so that the ``peftlite`` command can offer them without importing the demo
(and torchvision's models) for the commands that do not need it.
"""

from __future__ import annotations

import argparse

from ..integrations import tensorboard

DESCRIPTION = "pretrain a small CNN on digits 0-4, adapt it to 5-9 four ways, ship and merge the adapter"


def _epochs(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _tensorboard_dir(text: str) -> str:
    if not tensorboard.available():  # refused before any training starts
        raise argparse.ArgumentTypeError(tensorboard.MISSING)
    return text


def add_tensorboard(p: argparse.ArgumentParser) -> None:
    """``--tensorboard DIR``, shared by the demo and the examples."""
    p.add_argument("--tensorboard", type=_tensorboard_dir, default=None, metavar="DIR",
                   help="also log loss/train and accuracy/test per epoch to TensorBoard, one run per method "
                        f"under DIR (needs {tensorboard.INSTALL})")


def add_arguments(p: argparse.ArgumentParser) -> None:
    """The demo's options, shared by ``python -m peftlite.demo`` and ``peftlite demo``."""
    p.add_argument("--out", default="demo_out", metavar="DIR",
                   help="folder for weights, adapters, curves.png, report.md (default demo_out)")
    p.add_argument("--epochs", type=_epochs, default=None, metavar="N",
                   help="adaptation epochs per method (default 8; 1 with --quick)")
    p.add_argument("--seed", type=int, default=0, metavar="S", help="random seed (default 0)")
    p.add_argument("--quick", action="store_true", help="a few seconds: 2 pretraining epochs, 1 per method")
    p.add_argument("--no-progress", action="store_true", help="no tqdm bars")
    add_tensorboard(p)
