"""Glob patterns on qualified module or parameter names, resolved to parameter names.

A pattern selects a parameter when it matches the parameter's own name (``fc.weight``) or the name of
any module that holds it (``fc``, ``layer4``, ``layer4.0``). So ``"fc"`` covers ``fc.weight`` and
``fc.bias``, ``"layer4"`` and ``"layer4.*"`` cover all of layer4, and ``"*.lora.*"`` covers every
adapter. Shared by freeze/unfreeze, param_groups and the Unfreezer, so the three agree.
"""

from __future__ import annotations

import fnmatch
from collections.abc import Iterable, Sequence

from torch import nn

from . import targets as targets_


def owners(name: str) -> list[str]:
    """The modules that hold parameter ``name``, outermost first: ``a.b.w`` -> ``["a", "a.b"]``."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(1, len(parts) + 1)]


def matches(pattern: str, name: str) -> bool:
    """Does the glob select parameter ``name`` (by its own name or a holding module's name)?"""
    return fnmatch.fnmatchcase(name, pattern) or any(fnmatch.fnmatchcase(m, pattern) for m in owners(name))


def as_patterns(patterns: str | Iterable[str], what: str) -> list[str]:
    """Normalise one glob or a sequence of globs; raises TypeError for anything else."""
    patterns = [patterns] if isinstance(patterns, str) else list(patterns)
    for p in patterns:
        if not isinstance(p, str) or not p:
            raise TypeError(f"{what}: patterns are non-empty glob strings on module or parameter names "
                            f"(e.g. 'layer4' or 'fc.weight'); got {p!r} ({type(p).__name__})")
    return patterns


def select(model: nn.Module, patterns: Sequence[str], what: str) -> list[str]:
    """Parameter names (registration order, no duplicates) selected by any of ``patterns``.

    Args:
        model: the model whose ``named_parameters()`` are searched.
        patterns: globs, each of which must select at least one parameter.
        what: the caller's name, for error messages (``"freeze"``).
    Returns:
        the selected parameter names.
    Raises:
        ValueError: a pattern that selects no parameter, with up to 5 nearest module/parameter names.
    """
    names = [n for n, _ in model.named_parameters()]
    for pattern in patterns:
        if not any(matches(pattern, n) for n in names):
            raise ValueError(no_match(model, pattern, what))
    return [n for n in names if any(matches(p, n) for p in patterns)]


def no_match(model: nn.Module, pattern: str, what: str) -> str:
    """The error text for a pattern that selects nothing, naming the nearest names."""
    candidates = [n for n, m in model.named_modules() if next(m.parameters(), None) is not None]
    candidates += [n for n, _ in model.named_parameters()]
    near = ", ".join(targets_.nearest(pattern, candidates)) or "(the model has no parameters)"
    return f"{what}: pattern {pattern!r} matched no module or parameter; nearest: {near}"
