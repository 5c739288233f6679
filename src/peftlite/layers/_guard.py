"""A guard for the temporary ``W + scale·ΔW`` that direct readers of ``module.weight`` receive.

Code such as ``nn.init.zeros_(layer.weight)`` on an adapted, unmerged layer would write into that
temporary and be lost. The guard turns such writes into a loud error; every other operation sees a plain
tensor (results are plain tensors too). Under ``torch.compile`` the guard is skipped, since compiled code
does not mutate weights.
"""

from __future__ import annotations

import torch
from torch import Tensor

_INPLACE_DUNDERS = frozenset({
    "__setitem__", "__iadd__", "__isub__", "__imul__", "__itruediv__", "__ifloordiv__", "__imod__",
    "__ipow__", "__iand__", "__ior__", "__ixor__", "__ilshift__", "__irshift__", "__imatmul__", "__idiv__",
})


def _writes_in_place(func, args, kwargs) -> bool:
    name = getattr(func, "__name__", "")
    if kwargs and kwargs.get("out") is not None:
        return any(isinstance(t, EffectiveWeight) for t in _flat(kwargs["out"]))
    is_inplace = name in _INPLACE_DUNDERS or (name.endswith("_") and not name.endswith("__"))
    return is_inplace and bool(args) and isinstance(args[0], EffectiveWeight)


def _flat(x):
    return x if isinstance(x, (tuple, list)) else (x,)


class EffectiveWeight(Tensor):
    """``W + scale·ΔW`` as handed to a direct reader; refuses in-place writes."""

    @classmethod
    def __torch_function__(cls, func, types, args=(), kwargs=None):
        if _writes_in_place(func, args, kwargs):
            raise RuntimeError(
                f"in-place write ({getattr(func, '__name__', func)}) to the effective weight of an adapted "
                "layer: it is a temporary W + scale·ΔW and the write would be lost. Write inside "
                "`with peftlite.disabled(model):` to change the base weight, or unwrap the model first."
            )
        with torch._C.DisableTorchFunctionSubclass():
            return func(*args, **(kwargs or {}))


def guard(t: Tensor) -> Tensor:
    """Wrap a temporary effective weight so that in-place writes to it raise."""
    if torch.compiler.is_compiling():
        return t
    return t.as_subclass(EffectiveWeight)
