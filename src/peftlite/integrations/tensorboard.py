"""TensorBoard logging for the demo and the examples: a ``SummaryWriter``, or an error naming the fix.

``tensorboard`` is an optional extra (``pip install 'peftlite[tensorboard]'``); nothing here imports it
until a writer is asked for.
"""

from __future__ import annotations

import importlib.util
import os

INSTALL = "pip install 'peftlite[tensorboard]'"
MISSING = f"TensorBoard logging needs the tensorboard package: {INSTALL}"


def available() -> bool:
    """Whether the tensorboard package is installed (found without importing it)."""
    return importlib.util.find_spec("tensorboard") is not None


def summary_writer(log_dir: str | os.PathLike):
    """A ``torch.utils.tensorboard.SummaryWriter`` writing event files into ``log_dir`` (created).

    Raises:
        ImportError: tensorboard is not installed; the message names the extra to install.
    """
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError as e:
        raise ImportError(f"{MISSING} ({e})") from e
    return SummaryWriter(os.fspath(log_dir))
