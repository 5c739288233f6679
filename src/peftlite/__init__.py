"""peftlite: exact, fast low-rank adapters (LoRA) and fine-tuning tools for PyTorch Conv2d and Linear layers.

    model = peftlite.wrap(model, targets="layer4.*", rank=8, heads={"fc": nn.Linear(512, 10)})
    ...train...
    peftlite.save(model, "adapter.safetensors")
    peftlite.merge(model)          # zero overhead; peftlite.unmerge(model) restores W bit-exactly
"""

from .blocks import Block, blocks
from .freezing import freeze, unfreeze
from .groups import param_groups
from .io import AdapterFileError, load, save
from .merge import disabled, merge, unmerge
from .summary import summary
from .unfreezer import Unfreezer
from .wrap import unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "Block",
    "Unfreezer",
    "__version__",
    "blocks",
    "disabled",
    "freeze",
    "load",
    "merge",
    "param_groups",
    "save",
    "summary",
    "unfreeze",
    "unmerge",
    "unwrap",
    "wrap",
]
