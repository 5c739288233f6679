"""peftlite: exact, fast low-rank adapters (LoRA) and fine-tuning tools for PyTorch Conv2d and Linear layers.

    model = peftlite.wrap(model, targets="layer4.*", rank=8, heads={"fc": nn.Linear(512, 10)})
    ...train...
    peftlite.save(model, "adapter.safetensors")
    peftlite.merge(model)          # zero overhead; peftlite.unmerge(model) restores W bit-exactly

The package reads bottom-up (docs/design.md): ``functional`` and ``kernels``, then ``layers``,
``selection``, ``merging`` and ``wrapping``, ``formats``, ``tuning``, and ``cli`` / ``demo`` on top.
"""

from ._version import __version__
from .combining import combine
from .formats.lycoris import LycorisFormatError
from .formats.native import load, save
from .formats.peft import PeftFormatError
from .formats.schema import AdapterFileError
from .hotswapping import hotswap, prepare_hotswap
from .layers.base import AdapterStateError
from .layers.spec import AdapterSpec
from .merging import disabled, merge, unmerge
from .switching import adapters, delete, per_sample, use
from .tuning.freezing import freeze, unfreeze
from .tuning.groups import param_groups
from .tuning.partition import Block, blocks
from .tuning.recomputation import checkpointing
from .tuning.report import summary
from .tuning.unfreezing import Unfreezer
from .wrapping import restore_base, unwrap, wrap

__all__ = [
    "AdapterFileError",
    "AdapterSpec",
    "AdapterStateError",
    "Block",
    "LycorisFormatError",
    "PeftFormatError",
    "Unfreezer",
    "__version__",
    "adapters",
    "blocks",
    "checkpointing",
    "combine",
    "delete",
    "disabled",
    "freeze",
    "hotswap",
    "load",
    "merge",
    "param_groups",
    "per_sample",
    "prepare_hotswap",
    "restore_base",
    "save",
    "summary",
    "unfreeze",
    "unmerge",
    "unwrap",
    "use",
    "wrap",
]
