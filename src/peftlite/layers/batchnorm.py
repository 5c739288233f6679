"""Frozen BatchNorm statistics: normalise with the running statistics, in train() and eval() alike, never update them.

A frozen BatchNorm's class is swapped to a subclass whose ``training`` attribute always reads False, so
every BatchNorm forward (timm's ``BatchNormAct2d`` included) takes its inference path. ``train()`` still
works and is remembered: unfreezing gives the module back the mode it was last asked for. Every
state_dict key (``num_batches_tracked`` included) stays as it is.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import Tensor, nn
from torch.nn.modules.batchnorm import _BatchNorm

from .registry import derived_class


class _FrozenAffine(torch.autograd.Function):
    """``F.batch_norm`` with running statistics and frozen affine parameters; backward ``∂x = ∂y·k``."""

    @staticmethod
    def forward(ctx, x: Tensor, bn: _BatchNorm) -> Tensor:
        y = F.batch_norm(x, bn.running_mean, bn.running_var, bn.weight, bn.bias, False, 0.0, bn.eps)
        var = bn.running_var.to(torch.promote_types(bn.running_var.dtype, torch.float32))
        k = torch.rsqrt(var + bn.eps)  # (C,)
        if bn.weight is not None:
            k = k * bn.weight.to(k.dtype)
        ctx.save_for_backward(k)
        ctx.dtype = x.dtype
        return y

    @staticmethod
    def backward(ctx, g: Tensor):
        (k,) = ctx.saved_tensors
        shape = (1, -1) + (1,) * (g.dim() - 2)  # channels on dim 1: (N, C), (N, C, L), (N, C, H, W), ...
        return (g * k.view(shape)).to(ctx.dtype), None


class FrozenStats:
    """Mixin placed before a BatchNorm class."""

    _frozen_base: type

    @property
    def training(self) -> bool:
        return False

    @training.setter
    def training(self, mode: bool) -> None:
        self.__dict__["_requested_training"] = bool(mode)

    def forward(self, x: Tensor) -> Tensor:
        base = self._frozen_base
        if (base.forward is not _BatchNorm.forward or not torch.is_grad_enabled() or not x.requires_grad
                or any(p is not None and p.requires_grad for p in (self.weight, self.bias))
                or torch.compiler.is_compiling()):
            return base.forward(self, x)
        self._check_input_dim(x)
        return _FrozenAffine.apply(x, self)


def freezable(module: nn.Module) -> bool:
    """A BatchNorm with running statistics that is not frozen yet."""
    return isinstance(module, _BatchNorm) and module.track_running_stats and not isinstance(module, FrozenStats)


def freeze_stats(module: _BatchNorm) -> None:
    mode = module.training
    module.__class__ = derived_class(FrozenStats, type(module), "Frozen", _frozen_base=type(module))
    module.training = mode  # remembered, not used


def unfreeze_stats(module: FrozenStats) -> None:
    mode = module.__dict__.pop("_requested_training", True)
    module.__class__ = module._frozen_base
    module.training = mode
