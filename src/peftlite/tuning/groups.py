"""param_groups: optimizer groups with per-pattern LRs, layer-wise LR decay and no-decay parameters.

    groups = peftlite.param_groups(model, 1e-3, lrs={"layer4.*": 1e-4}, layer_decay=0.75, weight_decay=0.05)
    opt = torch.optim.AdamW(groups)

Each trainable parameter lands in exactly one group. A parameter's LR is ``lrs[first matching pattern]``
(or ``lr``), times ``layer_decay ** (number of blocks - 1 - its block's index)`` when ``layer_decay`` is
given (see ``peftlite.blocks``), so the output block keeps the full LR and each block below gets
``layer_decay`` times the one above it.
"""

from __future__ import annotations

import math
import numbers
from collections.abc import Callable, Mapping, Sequence

from torch import nn
from torch.nn.modules.batchnorm import _BatchNorm
from torch.nn.modules.instancenorm import _InstanceNorm

from .. import selection
from .partition import block_index

NORM_TYPES: tuple[type, ...] = (_BatchNorm, _InstanceNorm, nn.LayerNorm, nn.GroupNorm, nn.LocalResponseNorm,
                                nn.RMSNorm)


def _positive(value, what: str, fix: str) -> float:
    if isinstance(value, bool) or not isinstance(value, numbers.Real) or not math.isfinite(value) \
            or value <= 0:
        raise ValueError(f"{what} must be a positive finite number, got {value!r}; {fix}")
    return float(value)


def check_options(lr, lrs, layer_decay, weight_decay, no_decay, what: str):
    """Validate and normalise the options shared by param_groups and the Unfreezer (changes nothing)."""
    lr = _positive(lr, f"{what}: lr", "e.g. lr=1e-3")
    lrs = {} if lrs is None else lrs
    if not isinstance(lrs, Mapping):
        raise TypeError(f"{what}: lrs must be a dict of pattern -> LR, e.g. {{'fc': 1e-3}}; got {type(lrs).__name__}")
    lrs = {p: _positive(v, f"{what}: lrs[{p!r}]", "give each pattern a positive LR") for p, v in lrs.items()}
    if layer_decay is not None:
        layer_decay = _positive(layer_decay, f"{what}: layer_decay", "use a factor in (0, 1], e.g. 0.75")
        if layer_decay > 1:
            raise ValueError(f"{what}: layer_decay={layer_decay!r} would raise LRs towards the input; "
                             "use a factor in (0, 1], e.g. 0.75")
    if isinstance(weight_decay, bool) or not isinstance(weight_decay, numbers.Real) or not weight_decay >= 0:
        raise ValueError(f"{what}: weight_decay must be a number >= 0, got {weight_decay!r}")
    return lr, lrs, layer_decay, float(weight_decay), selection.as_list(no_decay)


def decays(model: nn.Module, no_decay: Sequence) -> Callable[[str], bool]:
    """A predicate ``name -> bool``: does weight decay apply to this parameter?

    No decay for: every parameter of a normalization layer (by module type, since torchvision names
    its norms ``bn1``, ``ln_1``, ``features.0.1``), every bias, every parameter with one dimension or
    fewer, the names of a timm-style ``model.no_weight_decay()``, and what the ``no_decay`` patterns
    select (the one pattern language: ``"bias"`` selects every ``*.bias``, ``"*norm*"`` every parameter
    whose name or module name contains ``norm``). A pattern that selects nothing is not an error here:
    the defaults are meant for many models.
    """
    modules = dict(model.named_modules())
    extra = list(no_decay)
    hook = getattr(model, "no_weight_decay", None)
    if callable(hook):
        extra += [str(n) for n in hook()]
    params = dict(model.named_parameters())
    excluded = set(selection.select_tensors(model, extra, "no_decay", raise_empty=False)) if extra else set()

    def applies(name: str) -> bool:
        owner = modules[name.rpartition(".")[0]]
        if isinstance(owner, NORM_TYPES) or name.rpartition(".")[2] == "bias" or params[name].ndim <= 1:
            return False
        return name not in excluded

    return applies


def build(model: nn.Module, names: Sequence[str], lr: float, lrs: Mapping[str, float],
          layer_decay: float | None, weight_decay: float, no_decay: Sequence[str],
          prefix: str = "") -> list[dict]:
    """The groups for parameters ``names`` (checked options; see ``param_groups``).

    Groups are keyed by (block when layer_decay is given, first matching lrs pattern, decay or not) and
    ordered by their first parameter's registration order.
    """
    params = dict(model.named_parameters())
    found, index = block_index(model) if layer_decay is not None else ([], {})
    applies = decays(model, no_decay)
    names_index = selection.Index.of(model)
    tests = [(p, selection.tensor_predicate(p, names_index, "lrs")) for p in lrs]
    groups: dict[tuple, dict] = {}
    for name in names:
        pattern = next((p for p, test in tests if test(name)), None)
        block = index[name] if layer_decay is not None else None
        decay = applies(name)
        key = (block, pattern, decay)
        if key not in groups:
            scale = layer_decay ** (len(found) - 1 - block) if layer_decay is not None else 1.0
            label = [found[block].name] if block is not None else []
            label += [f"lrs[{pattern}]"] if pattern else []
            groups[key] = {"params": [], "lr": (lrs[pattern] if pattern else lr) * scale,
                           "weight_decay": weight_decay if decay else 0.0,
                           "name": prefix + "/".join(label + ["decay" if decay else "no_decay"])}
        groups[key]["params"].append(params[name])
    return list(groups.values())


def param_groups(model: nn.Module, lr: float, *, lrs: Mapping[str, float] | None = None,
                 layer_decay: float | None = None, weight_decay: float = 0.0,
                 no_decay: Sequence[str] = ("bias", "norm")) -> list[dict]:
    """Optimizer param groups for the model's trainable parameters, each exactly once.

    Args:
        model: any nn.Module; only parameters with ``requires_grad`` are included.
        lr: the LR of parameters no ``lrs`` pattern matches.
        lrs: ``{pattern: LR}`` selecting parameters as in ``freeze`` (``{"fc": 1e-3, "layer4.*": 1e-4}``);
            the first matching pattern wins. Raises when no pattern selects anything, or an exact name
            names nothing.
        layer_decay: scale LRs by ``layer_decay ** (blocks above)`` per block (``peftlite.blocks``;
            ``peftlite.summary(model, blocks=True)`` lists them). Multiplies the ``lrs`` LRs too.
        weight_decay: for parameters that decay; the others get 0 (see ``decays``).
        no_decay: extra patterns selecting parameters that get no weight decay (never raises).
    Returns:
        a list of dicts with ``params``, ``lr``, ``weight_decay`` and a readable ``name``
        (``"layer4.1/lrs[layer4.*]/no_decay"``), ready for any ``torch.optim`` optimizer.
    Raises:
        ValueError: a bad lr, layer_decay or weight_decay; ``lrs`` patterns that select nothing (lists
            patterns that would match); no trainable parameter.
        TypeError: lrs not a dict, or a pattern that is not a string.
    """
    lr, lrs, layer_decay, weight_decay, no_decay = check_options(lr, lrs, layer_decay, weight_decay, no_decay,
                                                                 "param_groups")
    if lrs:
        selection.select_tensors(model, list(lrs), "param_groups lrs")  # the typo rule
    names = [n for n, p in model.named_parameters() if p.requires_grad]
    if not names:
        raise ValueError("param_groups: the model has no trainable parameter; unfreeze some "
                         "(peftlite.unfreeze(model, 'fc')) or wrap it (peftlite.wrap) first")
    return build(model, names, lr, lrs, layer_decay, weight_decay, no_decay)
