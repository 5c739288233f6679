"""Resolve ``targets`` (globs, regexes, types, callables) to qualified module names.

A target selects modules; the adapted set is the supported modules it selects, plus the supported
modules beneath any container it selects. ``"layer4.*"`` therefore adapts the convs of layer4 and skips
its BatchNorms and ReLUs, while ``"bn1"`` (an exact name of an unsupported leaf) is an error.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections.abc import Callable, Iterable, Sequence
from typing import Union

from torch import nn

Matcher = Union[str, "re.Pattern[str]", type, tuple, Callable[[str, nn.Module], bool]]

_GLOB_CHARS = set("*?[")


def is_exact_name(pattern: object) -> bool:
    """True for a plain string with no glob characters: it names one module."""
    return isinstance(pattern, str) and not (_GLOB_CHARS & set(pattern))


def describe(matcher: object) -> str:
    if isinstance(matcher, str):
        return repr(matcher)
    if isinstance(matcher, re.Pattern):
        return f"re.compile({matcher.pattern!r})"
    if isinstance(matcher, type):
        return matcher.__name__
    if isinstance(matcher, tuple):
        return "(" + ", ".join(describe(m) for m in matcher) + ")"
    return getattr(matcher, "__name__", repr(matcher))


def as_list(targets: Matcher | Sequence[Matcher] | None) -> list[Matcher]:
    """Normalise ``targets`` to a list of single matchers (a tuple of types stays one matcher)."""
    if targets is None:
        return []
    if isinstance(targets, (list, set, frozenset)):
        return list(targets)
    return [targets]


def matches(matcher: Matcher, name: str, module: nn.Module) -> bool:
    """Does one matcher select the module at qualified ``name``?"""
    if isinstance(matcher, str):
        return fnmatch.fnmatchcase(name, matcher)
    if isinstance(matcher, re.Pattern):
        return matcher.fullmatch(name) is not None
    if isinstance(matcher, type) or (isinstance(matcher, tuple) and all(isinstance(t, type) for t in matcher)):
        return isinstance(module, matcher)
    if callable(matcher):
        return bool(matcher(name, module))
    raise TypeError(
        f"target {matcher!r} is a {type(matcher).__name__}; use a glob string, a compiled re.Pattern, "
        f"an nn.Module subclass (or a tuple of them), or a callable (name, module) -> bool"
    )


def nearest(pattern: object, names: Iterable[str], n: int = 5) -> list[str]:
    """Up to ``n`` module names closest to a pattern, for error messages."""
    names = [x for x in names if x]
    text = pattern.pattern if isinstance(pattern, re.Pattern) else str(pattern)
    close = difflib.get_close_matches(text, names, n=n, cutoff=0.0)
    return close[:n]


def select(model: nn.Module, matcher: Matcher) -> list[tuple[str, nn.Module]]:
    """Every (name, module) a single matcher selects, in registration order."""
    return [(name, m) for name, m in model.named_modules() if matches(matcher, name, m)]


def match_names(model: nn.Module, patterns: Sequence[str], what: str) -> list[str]:
    """Module names matched by glob ``patterns``; each pattern must match something.

    Raises:
        ValueError: a pattern that matches no module, with the nearest module names.
    """
    names = [n for n, _ in model.named_modules()]
    found: list[str] = []
    for pattern in patterns:
        if not isinstance(pattern, str):
            raise TypeError(f"{what} entries are glob strings; got {pattern!r} ({type(pattern).__name__})")
        hit = [n for n in names if fnmatch.fnmatchcase(n, pattern)]
        if not hit:
            raise ValueError(f"{what} pattern {pattern!r} matched no module; nearest: "
                             f"{', '.join(nearest(pattern, names)) or '(model has no submodules)'}")
        found += [n for n in hit if n not in found]
    return found
