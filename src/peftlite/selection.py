"""The one pattern language: what a pattern selects, the same for every argument that takes patterns.

A pattern is one of:

=============================  =================================================================
``"layer4.*"``, ``"*.query"``  a glob (``fnmatch``, case-sensitive) on qualified names; ``*`` crosses dots
``"layer4.0.conv1"``           an exact name (no wildcard): that name
``"query"``                    a *bare* name (no dot, no wildcard). If the model has a top-level module
                               or tensor of that name, that one only; otherwise every name whose last
                               part is ``query`` (PEFT's ``target_modules`` habit)
``re.compile(r"layer\\d")``     a regular expression, full match on qualified names
``nn.Conv2d``, a tuple of them  every module of that type (subclasses too)
``lambda name, m: ...``        every module for which it returns true
a list of these                the union
=============================  =================================================================

Arguments select either *modules* (``wrap(targets=)``, ``heads=`` keys) or *tensors* (``trainable=``,
``freeze``/``unfreeze``, ``param_groups(lrs=, no_decay=)``, ``Unfreezer`` schedules, ``save(include=)``).
A tensor is selected when the pattern selects its own name (``fc.weight``) or any module that holds it
(``fc``, ``layer4``, the root for a type pattern), so ``"fc"`` means the same everywhere.

Errors: a list raises only when all of it selects nothing, or when an exact name (no wildcard) names
nothing, neither as a full name nor, bare, as a last name part (a typo). The hint lists patterns that
would match, with their counts (``'*.query' (12 modules)``), or for a type the adaptable types the
model has. ``no_decay`` never raises, since its defaults serve every model.
"""

from __future__ import annotations

import difflib
import fnmatch
import re
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass
from typing import Union

from torch import nn

Pattern = Union[str, "re.Pattern[str]", type, tuple, Callable[[str, nn.Module], bool]]
Predicate = Callable[[str, "nn.Module | None"], bool]  # (qualified name, module or None for a tensor)

_GLOB_CHARS = frozenset("*?[")


def is_exact(pattern: object) -> bool:
    """A plain string with no wildcard: it names something (a full name, or bare a last name part)."""
    return isinstance(pattern, str) and not (_GLOB_CHARS & set(pattern))


def is_bare(pattern: object) -> bool:
    """An exact name with no dot (``"query"``): may select by last name part."""
    return is_exact(pattern) and "." not in pattern


def _is_types(pattern: object) -> bool:
    return isinstance(pattern, type) or (isinstance(pattern, tuple) and bool(pattern)
                                         and all(isinstance(t, type) for t in pattern))


def as_list(patterns: Pattern | Iterable[Pattern] | None) -> list[Pattern]:
    """Normalise one pattern or a collection of them to a list (a tuple of types stays one pattern)."""
    if patterns is None:
        return []
    if isinstance(patterns, (list, set, frozenset)) or (isinstance(patterns, tuple) and not _is_types(patterns)):
        return list(patterns)
    return [patterns]


def describe_pattern(pattern: object) -> str:
    """A pattern as the user wrote it, for messages."""
    if isinstance(pattern, str):
        return repr(pattern)
    if isinstance(pattern, re.Pattern):
        return f"re.compile({pattern.pattern!r})"
    if isinstance(pattern, type):
        return pattern.__name__
    if isinstance(pattern, tuple):
        return "(" + ", ".join(describe_pattern(m) for m in pattern) + ")"
    return getattr(pattern, "__name__", repr(pattern))


@dataclass(frozen=True)
class Index:
    """The names a model offers to patterns: its modules, and its top-level module and tensor names."""

    modules: dict[str, nn.Module]
    top: frozenset[str]

    @classmethod
    def of(cls, model: nn.Module) -> Index:
        top = {n for n, _ in model.named_children()}
        top |= {n for n, _ in model.named_parameters(recurse=False)}
        top |= {n for n, _ in model.named_buffers(recurse=False)}
        return cls(dict(model.named_modules()), frozenset(top))


def predicate(pattern: Pattern, index: Index, what: str) -> Predicate:
    """The pattern as a test on one qualified name (``module`` is None when the name is a tensor's).

    Raises:
        TypeError: not a pattern (names the argument and the accepted forms).
    """
    if isinstance(pattern, str) and pattern:
        if is_bare(pattern) and pattern not in index.top:
            suffix = "." + pattern
            return lambda name, m: name.endswith(suffix)
        return lambda name, m: fnmatch.fnmatchcase(name, pattern)
    if isinstance(pattern, re.Pattern):
        return lambda name, m: pattern.fullmatch(name) is not None
    if _is_types(pattern):
        return lambda name, m: m is not None and isinstance(m, pattern)
    if callable(pattern) and not isinstance(pattern, str):
        return lambda name, m: m is not None and bool(pattern(name, m))
    raise TypeError(
        f"{what}: {pattern!r} ({type(pattern).__name__}) is not a pattern; use a name or glob string "
        "('layer4', '*.query'), a compiled re.Pattern, an nn.Module subclass (or a tuple of them), a "
        "callable (name, module) -> bool, or a list of these"
    )


def owners(name: str) -> list[str]:
    """The modules that hold tensor ``name``, the root first: ``a.b.w`` -> ``["", "a", "a.b"]``."""
    parts = name.split(".")[:-1]
    return [".".join(parts[:i]) for i in range(len(parts) + 1)]


def tensor_predicate(pattern: Pattern, index: Index, what: str) -> Callable[[str], bool]:
    """The pattern as a test on a tensor name: its own name, or any module holding it, is selected."""
    test = predicate(pattern, index, what)
    return lambda name: test(name, None) or any(test(o, index.modules.get(o)) for o in owners(name))


# ---- selecting, with the one error rule --------------------------------------------------------

def check_exact(hits: list[list[str]], patterns: list[Pattern], what: str, noun: str,
                hint: Callable[[Pattern], str]) -> None:
    """Raise ValueError for an exact name that names nothing (``hits[i]``: what ``patterns[i]`` named)."""
    for pattern, found in zip(patterns, hits, strict=True):
        if is_exact(pattern) and not found:
            how = "neither as a full name nor as the last part of one" if is_bare(pattern) else "as a full name"
            raise ValueError(f"{what}: {pattern!r} names no {noun} ({how}); {hint(pattern)}")


def check_any(hits: list[list[str]], patterns: list[Pattern], what: str, noun: str,
              hint: Callable[[Pattern], str]) -> None:
    """Raise ValueError when a non-empty list of patterns selects nothing at all."""
    if patterns and not any(hits):
        shown = ", ".join(describe_pattern(p) for p in patterns)
        raise ValueError(f"{what}: {shown} selected no {noun}; {hint(patterns[0])}")


def select_modules(model: nn.Module, patterns: Pattern | Sequence[Pattern] | None, what: str,
                   index: Index | None = None, among: Callable[[nn.Module], bool] | None = None) -> list[str]:
    """Qualified names of the modules the patterns select, in registration order, without duplicates.

    Args:
        among: a filter on the modules offered to the patterns; the hint proposes patterns among them.
    Raises:
        ValueError: the typo rule (module docstring). TypeError: something that is not a pattern.
    """
    index = index or Index.of(model)
    patterns = as_list(patterns)
    offered = {n: m for n, m in index.modules.items() if among is None or among(m)}
    hits = []
    for pattern in patterns:
        test = predicate(pattern, index, what)
        hits.append([n for n, m in offered.items() if test(n, m)])
    for check in (check_exact, check_any):
        check(hits, patterns, what, "module", lambda p: hint(p, offered, "modules"))
    chosen = {n for found in hits for n in found}
    return [n for n in offered if n in chosen]


def select_tensors(model: nn.Module, patterns: Pattern | Sequence[Pattern] | None, what: str,
                   names: Sequence[str] | None = None, index: Index | None = None,
                   raise_empty: bool = True) -> list[str]:
    """The tensor names (of ``names``, default the model's parameters) the patterns select, in order.

    Raises:
        ValueError: the typo rule, unless ``raise_empty`` is False (then nothing raises but TypeError).
        TypeError: something that is not a pattern.
    """
    index = index or Index.of(model)
    patterns = as_list(patterns)
    names = [n for n, _ in model.named_parameters()] if names is None else list(names)
    hits = []
    for pattern in patterns:
        test = tensor_predicate(pattern, index, what)
        hits.append([n for n in names if test(n)])
    if raise_empty:
        offered = dict.fromkeys(names)
        holders = {o: index.modules[o] for n in names for o in owners(n)[-1:] if o}
        for check in (check_exact, check_any):
            check(hits, patterns, what, "module or tensor", lambda p: hint(p, offered, "tensors", modules=holders))
    chosen = {n for found in hits for n in found}
    return [n for n in names if n in chosen]


# ---- hints ---------------------------------------------------------------------------------------

def _generalisations(name: str, tensor: bool) -> set[str]:
    """Patterns that select ``name``: itself, ``*.<last part>``, and each holding module (``a``, ``a.*``)."""
    parts = name.split(".")
    out = {name}
    if len(parts) > 1:
        out.add("*." + parts[-1])
        for i in range(1, len(parts)):
            prefix = ".".join(parts[:i])
            out |= {prefix, prefix + ".*"} if tensor else {prefix + ".*"}
    return out


def hint(pattern: Pattern, offered: dict[str, nn.Module | None], noun: str, n: int = 5,
         modules: dict[str, nn.Module] | None = None) -> str:
    """Patterns (with how many of ``offered`` each selects) ranked by likeness to ``pattern``.

    ``offered`` maps names to modules, or to None for tensor names. For a type or callable pattern, the
    types of the offered modules (or of ``modules``) instead: ``Linear (12), Conv2d (3)``.
    """
    named = [x for x in offered if x]
    if not named:
        return f"the model has no {noun}"
    if _is_types(pattern) or (callable(pattern) and not isinstance(pattern, (str, re.Pattern))):
        pool = modules if modules is not None else offered
        plain = [getattr(type(m), "plain_class", type(m)) for x, m in pool.items() if x and m is not None]
        types = Counter(t.__name__ for t in plain)
        listed = ", ".join(f"{t} ({c})" for t, c in types.most_common(n))
        return f"the model has: {listed}" if listed else f"the model has no {noun}"
    counts: Counter[str] = Counter()
    for x in named:
        counts.update(_generalisations(x, offered[x] is None))
    text = pattern.pattern if isinstance(pattern, re.Pattern) else str(pattern)
    likeness = {c: difflib.SequenceMatcher(None, text, c).ratio() for c in counts}
    ranked = sorted(counts, key=lambda c: (-likeness[c], -counts[c], c))[:n]
    return "patterns that would match: " + ", ".join(f"{c!r} ({counts[c]} {noun})" for c in ranked)
