"""Frozen BatchNorm statistics: normalise with the running statistics, in train() and eval() alike, never update them.

A frozen BatchNorm's class is swapped to a subclass whose ``training`` attribute always reads False, so
every BatchNorm forward (timm's ``BatchNormAct2d`` included) takes its inference path. ``train()`` still
works and is remembered: unfreezing gives the module back the mode it was last asked for. Every
state_dict key (``num_batches_tracked`` included) stays as it is.
"""

from __future__ import annotations

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm


class FrozenStats:
    """Mixin placed before a BatchNorm class."""

    _frozen_base: type

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_requested_training"] = bool(mode)


_CLASSES: dict[type, type] = {}


def _frozen_class(cls: type) -> type:
    if cls not in _CLASSES:
        _CLASSES[cls] = type(f"Frozen{cls.__name__}", (FrozenStats, cls),
                             {"_frozen_base": cls, "__module__": __name__, "__qualname__": f"Frozen{cls.__name__}"})
    return _CLASSES[cls]


def freezable(module: nn.Module) -> bool:
    """A BatchNorm with running statistics that is not frozen yet."""
    return isinstance(module, _BatchNorm) and module.track_running_stats and not isinstance(module, FrozenStats)


def freeze_stats(module: _BatchNorm) -> None:
    mode = module.training
    module.__class__ = _frozen_class(type(module))
    module.training = mode  # remembered, not used


def unfreeze_stats(module: FrozenStats) -> None:
    mode = module.__dict__.pop("_requested_training", True)
    module.__class__ = module._frozen_base
    module.training = mode
