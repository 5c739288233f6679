"""peftlite: exact, fast low-rank adapters (LoRA) and fine-tuning tools for PyTorch Conv2d and Linear layers.

    model = peftlite.wrap(model, targets="layer4.*", rank=8, heads={"fc": nn.Linear(512, 10)})
    ...train...
    peftlite.save(model, "adapter.safetensors")
    peftlite.merge(model)          # zero overhead; peftlite.unmerge(model) restores W bit-exactly
"""

from .io import AdapterFileError, load, save
from .merge import disabled, merge, unmerge
from .summary import summary
from .wrap import unwrap, wrap

__version__ = "0.1.0"

__all__ = [
    "AdapterFileError",
    "__version__",
    "disabled",
    "load",
    "merge",
    "save",
    "summary",
    "unmerge",
    "unwrap",
    "wrap",
]
