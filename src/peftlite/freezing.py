"""freeze / unfreeze: set ``requires_grad`` by glob patterns on module or parameter names.

Patterns are resolved before anything changes, so a bad pattern leaves the model as it was.

On a wrapped model (``peftlite.wrap``):

- ``unfreeze`` changes ``requires_grad`` only. A BatchNorm whose statistics wrap froze
  (``FrozenBatchNorm2d``, the default ``train_bn=False``) keeps normalising with its running statistics:
  unfreezing it trains its affine ``weight``/``bias``, never its statistics. Whether statistics adapt
  is chosen once, at wrap time, with ``train_bn=True``.
- ``peftlite.save`` writes adapters, heads, ``trainable=`` modules and (with ``train_bn``) BatchNorms.
  Base parameters unfrozen here are not among them; ``unfreeze`` warns when that happens. To have a
  fully trained module saved, name it in ``wrap(..., trainable=[...])`` instead.
- A later ``wrap`` call sets ``requires_grad`` again from its own arguments; freeze after wrapping.
"""

from __future__ import annotations

import warnings

from torch import nn

from . import _params


def _resolve(model: nn.Module, patterns: tuple[str, ...], what: str) -> list[str]:
    if not isinstance(model, nn.Module):
        raise TypeError(f"{what} takes an nn.Module first, got {type(model).__name__}")
    if not patterns:
        return [n for n, _ in model.named_parameters()]
    return _params.select(model, _params.as_patterns(list(patterns), what), what)


def set_requires_grad(model: nn.Module, names: list[str], flag: bool) -> None:
    """Set ``requires_grad`` of the named parameters (no checks; names come from ``_params.select``)."""
    params = dict(model.named_parameters())
    for name in names:
        params[name].requires_grad_(flag)


def unsaved(model: nn.Module, names: list[str]) -> list[str]:
    """Of ``names``, those a wrapped model's adapter file would not hold (empty for an unwrapped model)."""
    from .io import saveable
    from .wrap import wrap_state

    state = wrap_state(model)
    if state is None:
        return []
    kept = saveable(model, state)
    return [n for n in names if n not in kept]


def warn_unsaved(model: nn.Module, names: list[str], what: str) -> None:
    missing = unsaved(model, names)
    if missing:
        warnings.warn(
            f"{what}: {len(missing)} unfrozen parameter(s) of this wrapped model are not saved by "
            f"peftlite.save ({', '.join(missing[:3])}{', ...' if len(missing) > 3 else ''}); name their "
            "modules in wrap(..., trainable=[...]) to save them, or save the full model.state_dict()",
            UserWarning, stacklevel=3)


def freeze(model: nn.Module, *patterns: str) -> list[str]:
    """Set ``requires_grad=False`` on the parameters the patterns select (all of them when none is given).

    Args:
        model: any nn.Module.
        *patterns: globs on qualified module or parameter names. ``"fc"`` covers ``fc.weight`` and
            ``fc.bias``; ``"layer4.*"`` covers all of layer4; ``"*.lora.*"`` every adapter.
    Returns:
        the names of the selected parameters, in registration order.
    Raises:
        ValueError: a pattern selects nothing (names the pattern and up to 5 nearest names); the model
            is then unchanged.
        TypeError: a pattern that is not a non-empty string.
    """
    names = _resolve(model, patterns, "freeze")
    set_requires_grad(model, names, False)
    return names


def unfreeze(model: nn.Module, *patterns: str) -> list[str]:
    """Set ``requires_grad=True`` on the parameters the patterns select (all of them when none is given).

    A BatchNorm frozen by ``wrap`` keeps its statistics frozen; only its affine parameters train.
    On a wrapped model, warns when an unfrozen parameter would not be saved by ``peftlite.save``.

    Args:
        model: any nn.Module.
        *patterns: globs on qualified module or parameter names, as in ``freeze``.
    Returns:
        the names of the selected parameters, in registration order.
    Raises:
        ValueError: a pattern selects nothing (names the pattern and up to 5 nearest names); the model
            is then unchanged.
        TypeError: a pattern that is not a non-empty string.
    """
    names = _resolve(model, patterns, "unfreeze")
    set_requires_grad(model, names, True)
    warn_unsaved(model, names, "unfreeze")
    return names
