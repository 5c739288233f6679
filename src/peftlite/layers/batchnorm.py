"""Frozen BatchNorm statistics: normalise with the running statistics, in train() and eval() alike, never update them.

``freeze_stats`` swaps a BatchNorm's class to ``Frozen<Class>`` (made by ``registry.derived_class``, where
every run-time class is made); ``unfreeze_stats`` gives the class back. Only the forward differs:

- ``training`` stays the plain attribute that ``model.train()`` / ``model.eval()`` set, so code that reads
  it (a parent's forward, torch.compile's guards, a training loop's checks) sees the model's mode;
- the stock forward (``nn.BatchNorm1d/2d/3d``) is replaced by the inference one, ``F.batch_norm`` with the
  running statistics, whatever the mode; with frozen affine parameters it keeps only a (C,) factor for
  backward (``_FrozenAffine``);
- a class with its own forward (timm's ``BatchNormAct2d``: batch norm, then drop and act) decides from
  ``self.training`` inside it, so that forward runs with ``training`` False for the length of the call
  and the model's mode put back after it (its child modules keep theirs).

Every state_dict key (``num_batches_tracked`` included) stays as it is.
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
    """Mixin placed before a BatchNorm class: its forward is the inference one in either mode."""

    _frozen_base: type

    def forward(self, x: Tensor) -> Tensor:
        base = self._frozen_base
        if base.forward is not _BatchNorm.forward:
            mode = self.training
            self.training = False
            try:
                return base.forward(self, x)
            finally:
                self.training = mode
        self._check_input_dim(x)
        if (torch.is_grad_enabled() and x.requires_grad and not torch.compiler.is_compiling()
                and not any(p is not None and p.requires_grad for p in (self.weight, self.bias))):
            return _FrozenAffine.apply(x, self)
        return F.batch_norm(x, self.running_mean, self.running_var, self.weight, self.bias, False, 0.0, self.eps)


def freezable(module: nn.Module) -> bool:
    """A BatchNorm with running statistics that is not frozen yet."""
    return isinstance(module, _BatchNorm) and module.track_running_stats and not isinstance(module, FrozenStats)


def freeze_stats(module: _BatchNorm) -> None:
    module.__class__ = derived_class(FrozenStats, type(module), "Frozen", _frozen_base=type(module))


def unfreeze_stats(module: FrozenStats) -> None:
    module.__class__ = module._frozen_base
