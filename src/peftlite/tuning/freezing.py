"""freeze / unfreeze: set ``requires_grad`` by patterns selecting parameters (the one pattern language).

Patterns are resolved before anything changes, so a bad pattern leaves the model as it was.

On a wrapped model (``peftlite.wrap``):

- ``unfreeze`` changes ``requires_grad`` only. A BatchNorm whose statistics wrap froze
  (``FrozenBatchNorm2d``, the default ``train_bn=False``) keeps normalising with its running statistics:
  unfreezing it trains its affine ``weight``/``bias``, never its statistics. Whether statistics adapt
  is chosen once, at wrap time, with ``train_bn=True``.
- ``peftlite.save`` writes adapters, heads, ``trainable=`` tensors and (with ``train_bn``) BatchNorms.
  Base parameters unfrozen here are not among them; ``unfreeze`` warns when that happens. To have a
  fully trained module saved, name it in ``wrap(..., trainable=[...])`` instead.
- A later ``wrap`` call sets ``requires_grad`` again from its own arguments; freeze after wrapping.
"""

from __future__ import annotations

import warnings

from torch import nn

from .. import selection
from ..state import wrap_state
from ..wrapping import saved_tensors


def _resolve(model: nn.Module, patterns: tuple, what: str) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module first, got {type(model).__name__}")
    if not patterns:
        return [n for n, _ in model.named_parameters()]
    return selection.select_tensors(model, list(patterns), what)


def set_requires_grad(model: nn.Module, names: list[str], flag: bool) -> None:
    """Set ``requires_grad`` of the named parameters (no checks; the names come from a selection)."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(flag)


def warn_unsaved(model: nn.Module, names: list[str], what: str) -> None:
    """Warn when parameters of a wrapped model that now train would not be in its adapter file."""
    state = wrap_state(model)
    if state is None:
        return
    kept = saved_tensors(model, state)
    missing = [n for n in names if n not in kept]
    if missing:
        warnings.warn(
            f"{what}: {len(missing)} unfrozen parameter(s) of this wrapped model are not saved by "
            f"peftlite.save ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); name their "
            "modules in wrap(..., trainable=[...]) to save them, or save the full model.state_dict()",
            UserWarning, stacklevel=3)


def freeze(model: nn.Module, *patterns) -> list[str]:
    """Set ``requires_grad=False`` on the parameters the patterns select (all of them when none is given).

    Args:
        model: any nn.Module.
        *patterns: patterns selecting parameters (docs/guide.md, "Patterns"): ``"fc"`` covers
            ``fc.weight`` and ``fc.bias``; ``"layer4.*"`` all of layer4; ``"*.lora.*"`` every adapter;
            ``"bias"`` every bias; ``nn.LayerNorm`` every LayerNorm's parameters.
    Returns:
        the names of the selected parameters, in registration order.
    Raises:
        ValueError: the patterns select nothing, or an exact name names nothing (lists patterns that
            would match); the model is then unchanged.
        TypeError: something that is not a pattern.
    """
    names = _resolve(model, patterns, "freeze")
    set_requires_grad(model, names, False)
    return names


def unfreeze(model: nn.Module, *patterns) -> list[str]:
    """Set ``requires_grad=True`` on the parameters the patterns select (all of them when none is given).

    A BatchNorm frozen by ``wrap`` keeps its statistics frozen; only its affine parameters train.
    On a wrapped model, warns when an unfrozen parameter would not be saved by ``peftlite.save``.

    Args:
        model: any nn.Module.
        *patterns: patterns selecting parameters, as in ``freeze``.
    Returns:
        the names of the selected parameters, in registration order.
    Raises:
        ValueError: the patterns select nothing, or an exact name names nothing; the model is then
            unchanged.
        TypeError: something that is not a pattern.
    """
    names = _resolve(model, patterns, "unfreeze")
    set_requires_grad(model, names, True)
    warn_unsaved(model, names, "unfreeze")
    return names
